//! Server-sent events framing, shared by every streaming translator: bytes in, whole events out
//! (their raw bytes, for pass-through, and their `event:`/`data:` fields, for translation).
//! Nothing of an event is released before its blank line has arrived.

/// An event larger than this breaks the stream instead of growing a buffer without bound.
pub const MAX_EVENT: usize = 4 << 20;

/// One complete event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The event's bytes as received, blank line included.
    pub raw: &'a [u8],
    /// The `event:` field, if any.
    pub name: Option<&'a [u8]>,
    /// The `data:` lines joined with `\n` (one leading space of each line removed).
    pub data: &'a [u8],
    /// At least one `data:` line was present (comments and keep-alives have none).
    pub has_data: bool,
}

/// Splits a byte stream into events, across any chunking.
#[derive(Debug, Default, Clone)]
pub struct SseFramer {
    /// Bytes of the event being received.
    pending: Vec<u8>,
    /// Where the current line starts in `pending`.
    line_start: usize,
    data: Vec<u8>,
    has_data: bool,
    name: Option<Vec<u8>>,
}

impl SseFramer {
    /// Feeds the next bytes; calls `on_event` for each event completed by them. `Err` when an
    /// event passes [`MAX_EVENT`] bytes (the stream should be treated as broken).
    pub fn feed(
        &mut self,
        chunk: &[u8],
        mut on_event: impl FnMut(SseEvent<'_>),
    ) -> Result<(), String> {
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            self.pending.extend_from_slice(&rest[..=pos]);
            rest = &rest[pos + 1..];
            let mut end = self.pending.len() - 1;
            if end > self.line_start && self.pending[end - 1] == b'\r' {
                end -= 1;
            }
            let (start, line_start) = (self.line_start, self.pending.len());
            if start == end {
                on_event(SseEvent {
                    raw: &self.pending,
                    name: self.name.as_deref(),
                    data: &self.data,
                    has_data: self.has_data,
                });
                self.pending.clear();
                self.data.clear();
                self.has_data = false;
                self.name = None;
                self.line_start = 0;
                continue;
            }
            self.field(start, end);
            self.line_start = line_start;
        }
        self.pending.extend_from_slice(rest);
        if self.pending.len() > MAX_EVENT {
            self.pending.clear();
            self.line_start = 0;
            return Err(format!("an event exceeded {MAX_EVENT} bytes"));
        }
        Ok(())
    }

    /// Part of an event has arrived without its end.
    pub fn has_partial(&self) -> bool {
        !self.pending.is_empty()
    }

    fn field(&mut self, start: usize, end: usize) {
        let line = &self.pending[start..end];
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => return, // a comment
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => self.name = Some(value.to_vec()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = ": keep-alive\n\n\
event: message_start\r\ndata: {\"a\":1}\r\n\r\n\
data: one\ndata:two\n\n\
data: [DONE]\n\n";

    /// (raw, name, data, has_data) of one event.
    type Owned = (Vec<u8>, Option<Vec<u8>>, Vec<u8>, bool);

    fn collect(framer: &mut SseFramer, chunk: &[u8], out: &mut Vec<Owned>) {
        framer
            .feed(chunk, |e| {
                out.push((
                    e.raw.to_vec(),
                    e.name.map(<[u8]>::to_vec),
                    e.data.to_vec(),
                    e.has_data,
                ))
            })
            .unwrap();
    }

    #[test]
    fn whole_events_across_any_split() {
        for split in 0..STREAM.len() {
            let mut f = SseFramer::default();
            let mut out = Vec::new();
            let (a, b) = STREAM.as_bytes().split_at(split);
            collect(&mut f, a, &mut out);
            collect(&mut f, b, &mut out);
            assert!(!f.has_partial());
            assert_eq!(out.len(), 4, "split {split}");
            assert!(!out[0].3);
            assert_eq!(out[1].1.as_deref(), Some(&b"message_start"[..]));
            assert_eq!(out[1].2, b"{\"a\":1}");
            assert_eq!(out[2].2, b"one\ntwo");
            assert_eq!(out[3].2, b"[DONE]");
            let raw: Vec<u8> = out.iter().flat_map(|e| e.0.clone()).collect();
            assert_eq!(raw, STREAM.as_bytes(), "raw bytes are relayed unchanged");
        }
    }

    #[test]
    fn a_cut_event_is_never_released() {
        let mut f = SseFramer::default();
        let mut out = Vec::new();
        collect(&mut f, b"data: {\"x\":1}\n\ndata: {\"choi", &mut out);
        assert_eq!(out.len(), 1);
        assert!(f.has_partial());
    }

    #[test]
    fn oversized_events_break_the_stream() {
        let mut f = SseFramer::default();
        assert!(f.feed(b"data: ", |_| {}).is_ok());
        assert!(f.feed(&vec![b'x'; MAX_EVENT], |_| {}).is_err());
    }
}
