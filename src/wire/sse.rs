//! A scanner over a relayed SSE stream: the bytes go to the client untouched, while the scanner
//! notes what the gateway must know — did `[DONE]` arrive, what usage was reported, did the
//! upstream send an error event.

use super::openai::Usage;

/// Lines longer than this are not inspected (they are still relayed), so a hostile upstream
/// cannot make the scanner buffer without bound.
const MAX_LINE: usize = 1 << 20;

/// What has been seen so far on one stream.
#[derive(Debug, Default, Clone)]
pub struct SseScanner {
    partial: Vec<u8>,
    overlong: bool,
    /// `data: [DONE]` arrived.
    pub done: bool,
    /// The last usage object seen (OpenAI sends it once, in the final chunk).
    pub usage: Option<Usage>,
    /// The upstream sent an `{"error": ...}` event.
    pub upstream_error: bool,
    /// Data events seen, `[DONE]` excluded.
    pub events: u64,
}

impl SseScanner {
    /// Feeds the next chunk of bytes, in arrival order.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(pos);
            rest = &tail[1..];
            if self.overlong {
                self.overlong = false;
                self.partial.clear();
                continue;
            }
            if self.partial.is_empty() {
                self.line(line);
            } else {
                let mut full = std::mem::take(&mut self.partial);
                full.extend_from_slice(line);
                self.line(&full);
            }
        }
        if !rest.is_empty() && !self.overlong {
            if self.partial.len() + rest.len() > MAX_LINE {
                self.overlong = true;
                self.partial.clear();
            } else {
                self.partial.extend_from_slice(rest);
            }
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        self.events += 1;
        // Only chunks that may carry usage or an error are worth a JSON parse.
        let has = |needle: &[u8]| data.windows(needle.len()).any(|w| w == needle);
        if has(b"\"usage\"") || has(b"\"error\"") {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
                if let Some(u) = Usage::from_object(&v) {
                    self.usage = Some(u);
                }
                if v.get("error").is_some_and(|e| !e.is_null()) {
                    self.upstream_error = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str =
        "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}],\"usage\":null}\n\n\
data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1}}\n\n\
data: [DONE]\n\n";

    #[test]
    fn sees_usage_and_done_across_any_split() {
        for split in 1..STREAM.len() {
            let mut s = SseScanner::default();
            let (a, b) = STREAM.as_bytes().split_at(split);
            s.feed(a);
            s.feed(b);
            assert!(s.done, "split {split}");
            assert_eq!(s.events, 3);
            assert_eq!(
                s.usage,
                Some(Usage {
                    prompt_tokens: 4,
                    completion_tokens: 1
                })
            );
        }
    }

    #[test]
    fn crlf_and_errors() {
        let mut s = SseScanner::default();
        s.feed(b"data: {\"error\":{\"message\":\"boom\"}}\r\n\r\n");
        assert!(s.upstream_error && !s.done);
    }

    #[test]
    fn overlong_lines_are_skipped_not_buffered() {
        let mut s = SseScanner::default();
        s.feed(b"data: ");
        s.feed(&vec![b'x'; MAX_LINE + 10]);
        assert!(s.partial.is_empty());
        s.feed(b"\ndata: [DONE]\n");
        assert!(s.done);
    }
}
