//! Server-sent events framing (the WHATWG event-stream format): bytes in, events out.
//!
//! Only framing: `event:` and `data:` fields, comments and `id:`/`retry:` ignored, events ended
//! by a blank line, `\n`, `\r\n` and `\r` line endings. What the data means is the plugin's job.

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

#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    event: Option<String>,
    data: Option<String>,
}

impl Decoder {
    /// Feed bytes; get every event completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Event> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < self.buf.len() {
            let b = self.buf[i];
            if b == b'\n' || b == b'\r' {
                // A `\r` at the very end may be the first half of `\r\n`: wait for more bytes.
                if b == b'\r' && i + 1 == self.buf.len() {
                    break;
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
                continue;
            }
            i += 1;
        }
        self.buf.drain(..start);
        out
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
    fn unterminated_complete_event_is_kept() {
        let mut d = Decoder::default();
        assert!(d.push(b"data: x\n").is_empty());
        assert_eq!(d.finish().unwrap().unwrap().data, "x");
    }
}
