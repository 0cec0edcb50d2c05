//! Server-sent events on the plugin's side: the host frames an upstream's stream into
//! [`SseEvent`]s before a plugin sees them, so a plugin only needs [`event_json`] to read one.
//! [`events`] frames a whole body the same way, for an upstream that answers a request with an
//! event stream in one body, and for unit tests that feed a recorded stream through
//! `parse_stream_event`.

use crate::{PluginError, SseEvent, upstream_error};

/// The events of a whole event-stream body, framed as the host frames a live stream: `data:`
/// lines joined by `\n`, the last `event:` name, comments (`:`) and other fields ignored, an
/// event ended by a blank line (`\n`, `\r\n` or `\r` line endings). A last event without its
/// blank line still counts; an event with no `data:` line is no event.
pub fn events(body: &str) -> Vec<SseEvent> {
    let mut out = Vec::new();
    let mut event: Option<String> = None;
    let mut data: Option<String> = None;
    let mut end = |event: &mut Option<String>, data: &mut Option<String>| {
        let name = event.take();
        if let Some(data) = data.take() {
            out.push(SseEvent { event: name, data });
        }
    };
    let normalized = body.replace("\r\n", "\n").replace('\r', "\n");
    for line in normalized.split('\n') {
        if line.is_empty() {
            end(&mut event, &mut data);
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => match data.as_mut() {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            "event" => event = Some(value.to_string()),
            _ => {}
        }
    }
    end(&mut event, &mut data);
    out
}

/// An event's data parsed as JSON; anything else is an upstream-class error (the upstream sent
/// something the plugin cannot read), never a panic.
pub fn event_json<T: serde::de::DeserializeOwned>(event: &SseEvent) -> Result<T, PluginError> {
    serde_json::from_str(&event.data)
        .map_err(|e| upstream_error(format!("malformed upstream stream event: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorClass;

    #[test]
    fn frames_like_the_host() {
        let body = ": keep-alive\r\nevent: delta\r\ndata: {\"a\":1}\r\n\r\ndata: one\ndata: two\nid: 7\n\ndata:[DONE]";
        let evs = events(body);
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[0].event.as_deref(), Some("delta"));
        assert_eq!(evs[0].data, "{\"a\":1}");
        assert_eq!(evs[1].event, None);
        assert_eq!(evs[1].data, "one\ntwo");
        assert_eq!(evs[2].data, "[DONE]");
        assert!(crate::is_done(&evs[2]));
        // An event with a name but no data is no event; blank lines alone make none.
        assert!(events("event: ping\n\n\n\n").is_empty());
        assert_eq!(events("data: x\r\rdata: y\n").len(), 2);
    }

    #[test]
    fn event_data_as_json() {
        let ev = SseEvent {
            event: None,
            data: r#"{"n": 2}"#.into(),
        };
        let v: serde_json::Value = event_json(&ev).unwrap();
        assert_eq!(v["n"], 2);
        let bad = SseEvent {
            event: None,
            data: "{nope".into(),
        };
        let e = event_json::<serde_json::Value>(&bad).unwrap_err();
        assert_eq!(e.class, ErrorClass::Upstream);
    }
}
