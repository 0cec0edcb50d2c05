//! Server-sent events framing (the WHATWG event-stream format): bytes in, events out.
//!
//! Only framing: `event:` and `data:` fields, comments and `id:`/`retry:` ignored, events ended
//! by a blank line, `\n`, `\r\n` and `\r` line endings. What the data means is the plugin's job.
//! A decoder made with [`Decoder::bounded`] refuses, through [`Decoder::try_push`], an event whose
//! lines (as received) or a single line add up to more than its bound, so a peer that never ends
//! an event cannot grow the buffer without limit.

/// One event: its `event:` name, if any, and its data lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event: Option<String>,
    pub data: String,
}

/// The stream ended in the middle of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the event stream ended in the middle of an event")]
pub struct Truncated;

/// An event (its `data:` and `event:` lines as received), or a single line, is over the bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an event of the stream is larger than the limit of {limit} bytes")]
pub struct EventTooLarge {
    pub limit: usize,
}

#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
    /// Bytes of the current event's `data:` and `event:` lines, line endings included.
    event_bytes: usize,
    /// The most `event_bytes` (or bytes of one line) that `try_push` accepts.
    limit: usize,
}

impl Default for Decoder {
    /// A decoder without a bound, for bodies already in memory.
    fn default() -> Self {
        Self::bounded(usize::MAX)
    }
}

impl Decoder {
    /// A decoder whose `try_push` refuses an event or a line over `max_event_bytes`.
    pub fn bounded(max_event_bytes: usize) -> Self {
        Self {
            buf: Vec::new(),
            event: None,
            data: None,
            event_bytes: 0,
            limit: max_event_bytes,
        }
    }

    /// Feed bytes; get every event completed by them. The bound is not checked: for bodies
    /// already in memory (see [`Decoder::try_push`]).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        // Unreachable with no limit; with one, what was completed before it is still returned.
        let _ = self.feed(bytes, usize::MAX, &mut out);
        out
    }

    /// Feed bytes; every event completed by them goes to `out`. An event or a line over the
    /// bound is an error (the events completed before it are in `out`); the decoder is then
    /// spent and the caller stops reading.
    pub fn try_push(&mut self, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), EventTooLarge> {
        self.feed(bytes, self.limit, out)
    }

    fn feed(
        &mut self,
        bytes: &[u8],
        limit: usize,
        out: &mut Vec<Event>,
    ) -> Result<(), EventTooLarge> {
        let over = EventTooLarge { limit: self.limit };
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        let mut i = 0;
        while i < self.buf.len() {
            let b = self.buf[i];
            if b == b'\n' || b == b'\r' {
                // A `\r` at the very end may be the first half of `\r\n`: wait for more bytes.
                if b == b'\r' && i + 1 == self.buf.len() {
                    break;
                }
                if i - start > limit {
                    return Err(over);
                }
                let line = String::from_utf8_lossy(&self.buf[start..i]).into_owned();
                if b == b'\r' && self.buf.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                i += 1;
                start = i;
                if let Some(ev) = self.line(&line) {
                    out.push(ev);
                }
                if self.event_bytes > limit {
                    return Err(over);
                }
                continue;
            }
            i += 1;
        }
        self.buf.drain(..start);
        if self.buf.len().saturating_add(self.event_bytes) > limit {
            return Err(over);
        }
        Ok(())
    }

    /// The stream ended: a complete trailing event is returned; a half-received one is an error.
    pub fn finish(&mut self) -> Result<Option<Event>, Truncated> {
        if !self.buf.is_empty() {
            let rest = String::from_utf8_lossy(&self.buf).into_owned();
            self.buf.clear();
            if !rest.trim().is_empty() {
                return Err(Truncated);
            }
        }
        Ok(self.dispatch())
    }

    fn dispatch(&mut self) -> Option<Event> {
        self.event_bytes = 0;
        let data = self.data.take();
        let event = self.event.take();
        data.map(|data| Event { event, data })
    }

    fn line(&mut self, line: &str) -> Option<Event> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        if matches!(field, "data" | "event") {
            self.event_bytes = self.event_bytes.saturating_add(line.len() + 1);
        }
        match field {
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            "event" => self.event = Some(value.to_string()),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere() {
        let text = "event: a\ndata: {\"x\":1}\n\n: comment\r\ndata: line1\r\ndata: line2\r\n\r\ndata: [DONE]\n\n";
        for split in 0..text.len() {
            let mut d = Decoder::default();
            let mut evs = d.push(&text.as_bytes()[..split]);
            evs.extend(d.push(&text.as_bytes()[split..]));
            assert_eq!(d.finish(), Ok(None));
            assert_eq!(evs.len(), 3, "split at {split}");
            assert_eq!(evs[0].event.as_deref(), Some("a"));
            assert_eq!(evs[1].data, "line1\nline2");
            assert_eq!(evs[2].data, "[DONE]");
        }
    }

    #[test]
    fn half_an_event_is_truncation() {
        let mut d = Decoder::default();
        assert!(d.push(b"data: {\"x\"").is_empty());
        assert_eq!(d.finish(), Err(Truncated));
    }

    #[test]
    fn the_bound_refuses_a_large_event_and_keeps_the_ones_before() {
        let mut d = Decoder::bounded(16);
        let mut out = Vec::new();
        assert_eq!(
            d.try_push(b"data: small\n\ndata: 0123456789", &mut out),
            Ok(())
        );
        assert_eq!(out.len(), 1);
        assert_eq!(
            d.try_push(b"abcdefgh", &mut out),
            Err(EventTooLarge { limit: 16 })
        );
        // Many data lines that add up, each short.
        let mut d = Decoder::bounded(16);
        let mut out = Vec::new();
        assert!(d.try_push(b"data: 12\ndata: 34\n", &mut out).is_err());
        assert!(out.is_empty());
        // A line that never ends, in small pieces.
        let mut d = Decoder::bounded(16);
        let mut out = Vec::new();
        assert!(d.try_push(b": comment ", &mut out).is_ok());
        assert!(d.try_push(b"that goes on", &mut out).is_err());
        // Exactly at the bound is fine, in any pieces, event after event; unbounded `push`
        // never refuses.
        let text = b"data: 1234\n\nevent: e\ndata:\n\n";
        for split in 0..text.len() {
            let mut d = Decoder::bounded(15);
            let mut out = Vec::new();
            assert_eq!(d.try_push(&text[..split], &mut out), Ok(()), "{split}");
            assert_eq!(d.try_push(&text[split..], &mut out), Ok(()), "{split}");
            assert_eq!(out.len(), 2);
            assert_eq!(out[0].data, "1234");
        }
        let mut d = Decoder::default();
        assert_eq!(d.push(&[b'x'; 100_000]).len(), 0);
    }

    #[test]
    fn unterminated_complete_event_is_kept() {
        let mut d = Decoder::default();
        assert!(d.push(b"data: x\n").is_empty());
        assert_eq!(d.finish().unwrap().unwrap().data, "x");
    }
}
