//! The engine: reads a chat request of any format, takes the next scripted behaviour and
//! answers it, rendering through [`crate::wire`] and shaping the body (cuts, pauses, delays).

use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;

use super::args::{has_word, plausible, weather_location};
use super::body::{BodyEnd, MockBody, Piece};
use super::script::{header_text, Behaviour, Cut};
use super::{
    authenticate, close_connection, gemini_response, json_response, record, status_code, Route,
    State,
};
use crate::wire::{
    anthropic, count_words, first_words, gemini, openai, ChatRequest, Finish, Format, Reply,
    RequestError, Thoughts, ToolCall,
};

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn sleep_ms(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// The body of an error response in the format of `route`.
fn request_error(route: &Route, e: &RequestError) -> Response<MockBody> {
    let status = status_code(e.status);
    if let Some(body) = &e.body {
        let bytes = Bytes::from(body.to_string());
        return match route {
            Route::Gemini { .. } => gemini_response(status, bytes),
            _ => json_response(status, bytes),
        };
    }
    match route {
        Route::OpenAi => json_response(
            status,
            openai::error_json(
                &e.message,
                "invalid_request_error",
                e.param.as_deref(),
                None,
            ),
        ),
        Route::Anthropic => json_response(
            status,
            anthropic::error_json("invalid_request_error", &e.message),
        ),
        Route::Gemini { .. } => gemini_response(status, gemini::request_error_json(e)),
    }
}

/// Reads the body as the route's format.
fn parse(
    state: &State,
    route: &Route,
    body: &Bytes,
    parsed: Option<&Value>,
) -> Result<ChatRequest, RequestError> {
    let checks = &state.checks;
    let Some(value) = parsed else {
        return Err(match route {
            Route::OpenAi => match openai::parse_request(body) {
                Err(e) => e,
                Ok(_) => unreachable!("a body that is not JSON does not parse"),
            },
            Route::Anthropic => RequestError::new(
                "There was an error parsing the body of your request: it is not valid JSON.",
                None,
            ),
            Route::Gemini { .. } => {
                RequestError::new("Invalid JSON payload received. Unexpected token.", None)
            }
        });
    };
    match route {
        Route::OpenAi => openai::request_checked(value, checks),
        Route::Anthropic => anthropic::parse_request(value, checks),
        Route::Gemini { model, stream, .. } => gemini::parse_request(value, model, *stream),
    }
}

/// Answers a chat request of any format.
pub(crate) async fn chat(
    state: &State,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, io::Error> {
    let format = route.format();
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    let auth = authenticate(state, format, &parts.headers, parts.uri.query());

    let streamed = match route {
        Route::Gemini { stream, .. } => stream,
        _ => contains(&body, b"\"stream\""),
    };
    if state.config.fixed && auth.is_ok() && !streamed {
        let fixed = &state.fixed_reply;
        let reply = match format {
            Format::OpenAi => fixed.openai.clone(),
            Format::Anthropic => fixed.anthropic.clone(),
            Format::Gemini => fixed.gemini.clone(),
        };
        let mut resp = json_response(StatusCode::OK, reply);
        resp.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("req_mockfixed"));
        return Ok(resp);
    }

    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    if state.config.record {
        record(state, format, &parts, &body, parsed.as_ref());
    }
    if let Err(resp) = auth {
        return Ok(*resp);
    }
    let chat = match parse(state, &route, &body, parsed.as_ref()) {
        Ok(c) => c,
        Err(e) => return Ok(request_error(&route, &e)),
    };

    let behaviour = state.next_behaviour(&chat.model, &body);
    let answer = Answer {
        state,
        route: &route,
        chat: &chat,
    };
    match behaviour {
        Behaviour::Ok {
            latency_ms,
            chunk_delay_ms,
            content,
            pause_after_chunks,
            omit_done,
            tool_calls,
            thinking,
            finish,
        } => {
            sleep_ms(latency_ms).await;
            let reply = answer.reply(Content {
                text: content,
                tool_calls,
                thinking,
                finish,
            });
            let shape = Shape {
                pause_after: pause_after_chunks,
                omit_done,
                ..Shape::whole()
            };
            Ok(answer.respond(&reply, chunk_delay_ms, shape))
        }
        Behaviour::Status {
            status,
            retry_after,
            retry_delay,
            body,
            headers,
            latency_ms,
        } => {
            sleep_ms(latency_ms).await;
            let code = status_code(status);
            let body = match body {
                Some(b) => Bytes::from(b.to_string()),
                None => match format {
                    Format::OpenAi => openai::default_error_for_status(code.as_u16(), &chat.model),
                    Format::Anthropic => {
                        anthropic::default_error_for_status(code.as_u16(), &chat.model)
                    }
                    Format::Gemini => gemini::default_error_for_status(
                        code.as_u16(),
                        &chat.model,
                        retry_delay.as_deref(),
                    ),
                },
            };
            let mut resp = match format {
                Format::Gemini => gemini_response(code, body),
                _ => json_response(code, body),
            };
            let h = resp.headers_mut();
            let retry_after = retry_after.as_ref().map(header_text);
            let retry_secs = retry_after.as_deref().and_then(|r| r.parse::<u64>().ok());
            if code == StatusCode::TOO_MANY_REQUESTS {
                rate_limit_headers(format, h, retry_secs);
            }
            if format == Format::Anthropic {
                let n = state.seq.fetch_add(1, Ordering::Relaxed);
                if let Ok(v) = HeaderValue::from_str(&format!("req_mock{n:016}")) {
                    h.insert("request-id", v);
                }
            }
            if let Some(r) = retry_after.and_then(|r| HeaderValue::from_str(&r).ok()) {
                h.insert("retry-after", r);
            }
            for (name, value) in headers {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    h.insert(n, v);
                }
            }
            Ok(resp)
        }
        Behaviour::Stall {
            latency_ms,
            chunk_delay_ms,
            ..
        }
        | Behaviour::Drop {
            latency_ms,
            chunk_delay_ms,
            ..
        } => {
            let end = if matches!(behaviour, Behaviour::Stall { .. }) {
                BodyEnd::Stall
            } else {
                BodyEnd::Abort
            };
            sleep_ms(latency_ms).await;
            let reply = answer.reply(Content::default());
            let shape = Shape {
                cut: behaviour.cut(),
                end,
                ..Shape::whole()
            };
            Ok(answer.respond(&reply, chunk_delay_ms, shape))
        }
        Behaviour::Close => Err(close_connection()),
        Behaviour::StreamError {
            after_chunks,
            message,
            error_type,
            latency_ms,
            chunk_delay_ms,
        } => {
            sleep_ms(latency_ms).await;
            let reply = answer.reply(Content::default());
            Ok(answer.stream_error(
                &reply,
                after_chunks,
                message.as_deref(),
                error_type.as_deref(),
                chunk_delay_ms,
            ))
        }
    }
}

/// The rate-limit headers each provider sends with a 429.
fn rate_limit_headers(format: Format, h: &mut http::HeaderMap, retry_secs: Option<u64>) {
    match format {
        Format::OpenAi => {
            let reset = format!("{}s", retry_secs.unwrap_or(1));
            let reset = HeaderValue::from_str(&reset).expect("ascii");
            h.insert("x-ratelimit-limit-requests", HeaderValue::from_static("30"));
            h.insert(
                "x-ratelimit-remaining-requests",
                HeaderValue::from_static("0"),
            );
            h.insert("x-ratelimit-reset-requests", reset);
            h.insert("x-ratelimit-limit-tokens", HeaderValue::from_static("6000"));
            h.insert(
                "x-ratelimit-remaining-tokens",
                HeaderValue::from_static("0"),
            );
            h.insert(
                "x-ratelimit-reset-tokens",
                HeaderValue::from_static("7.66s"),
            );
        }
        Format::Anthropic => {
            let reset = rfc3339(now_secs() + retry_secs.unwrap_or(1));
            let reset = HeaderValue::from_str(&reset).expect("ascii");
            h.insert(
                "anthropic-ratelimit-requests-limit",
                HeaderValue::from_static("50"),
            );
            h.insert(
                "anthropic-ratelimit-requests-remaining",
                HeaderValue::from_static("0"),
            );
            h.insert("anthropic-ratelimit-requests-reset", reset);
        }
        Format::Gemini => {}
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch.
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What a scripted `ok` asks the reply to be.
#[derive(Debug, Default)]
struct Content {
    text: Option<String>,
    tool_calls: Option<usize>,
    thinking: Option<String>,
    finish: Option<Finish>,
}

/// One request being answered.
struct Answer<'a> {
    state: &'a State,
    route: &'a Route,
    chat: &'a ChatRequest,
}

impl Answer<'_> {
    fn format(&self) -> Format {
        self.route.format()
    }

    /// Streamed (per the request for OpenAI and Anthropic, per the route for Gemini).
    fn streams(&self) -> bool {
        match self.route {
            Route::Gemini { stream, .. } => *stream,
            _ => self.chat.stream,
        }
    }

    /// The reply: scripted content, tool calls and thinking, or the defaults (text
    /// `mock(<name>): <last user text>`, or one call to the first tool for a weather question),
    /// cut to the request's max tokens.
    fn reply(&self, c: Content) -> Reply {
        let chat = self.chat;
        let format = self.format();
        let n = self.state.seq.fetch_add(1, Ordering::Relaxed);
        let id = match format {
            Format::OpenAi => format!("chatcmpl-mock{n:016}"),
            Format::Anthropic => format!("msg_mock{n:016}"),
            Format::Gemini => format!("mockResp{n:016}"),
        };
        let call_id = |i: usize| match format {
            Format::OpenAi => format!("call_mock{n:012}{i:03}"),
            Format::Anthropic => format!("toolu_mock{n:012}{i:03}"),
            Format::Gemini => String::new(),
        };
        let mut finish = c.finish.unwrap_or_default();
        let says_nothing = matches!(
            finish,
            Finish::ContentFilter | Finish::MalformedFunctionCall
        );
        let mut text = None;
        let mut tool_calls = Vec::new();
        match (c.tool_calls.filter(|&k| k > 0), chat.tools.is_empty()) {
            (Some(k), false) => {
                tool_calls = (0..k)
                    .map(|i| {
                        let tool = &chat.tools[i % chat.tools.len()];
                        ToolCall {
                            id: call_id(i),
                            name: tool.name.clone(),
                            arguments: plausible(&tool.parameters, &chat.last_user_text)
                                .to_string(),
                        }
                    })
                    .collect();
                text = c.text;
            }
            _ => match (c.text, chat.first_tool()) {
                (None, Some(tool))
                    if c.tool_calls.is_none()
                        && !says_nothing
                        && has_word(&chat.last_user_text, "weather") =>
                {
                    let param = tool.first_param().unwrap_or("location");
                    let mut args = serde_json::Map::new();
                    args.insert(
                        param.to_string(),
                        Value::String(weather_location(&chat.last_user_text)),
                    );
                    tool_calls.push(ToolCall {
                        id: call_id(0),
                        name: tool.name.clone(),
                        arguments: Value::Object(args).to_string(),
                    });
                }
                (Some(t), _) => text = Some(t),
                (None, _) if says_nothing => {}
                (None, _) => {
                    text = Some(format!(
                        "mock({}): {}",
                        self.state.config.name, chat.last_user_text
                    ))
                }
            },
        }
        if let Some(max) = chat.max_tokens {
            let text_words = text.as_deref().map_or(0, count_words);
            let call_words: u64 = tool_calls.iter().map(|c| count_words(&c.arguments)).sum();
            if text_words > max {
                text = text.map(|t| first_words(&t, max as usize));
                tool_calls.clear();
                finish = Finish::Length;
            } else if text_words + call_words > max {
                tool_calls.clear();
                finish = Finish::Length;
            }
        }
        let (thinking, thinking_tokens) = match (c.thinking, chat.thoughts) {
            (Some(t), Thoughts::Shown) => {
                let words = count_words(&t);
                (Some(t), words)
            }
            (Some(t), Thoughts::Hidden) => (None, count_words(&t)),
            _ => (None, 0),
        };
        let completion_tokens = text.as_deref().map_or(0, count_words)
            + tool_calls
                .iter()
                .map(|c| count_words(&c.arguments))
                .sum::<u64>();
        Reply {
            id,
            created: now_secs(),
            model: chat.model.clone(),
            thinking,
            text,
            tool_calls,
            finish,
            prompt_tokens: chat.prompt_tokens,
            completion_tokens,
            thinking_tokens,
        }
    }

    /// The stream's events; `omit_final` leaves out the final one (OpenAI `[DONE]`, Anthropic
    /// `message_stop`, Gemini the chunk with `finishReason`, keeping a JSON array's `]`).
    fn events(&self, reply: &Reply, omit_final: bool) -> Vec<Bytes> {
        let mut events = match self.route {
            Route::OpenAi => openai::stream_events(
                reply,
                self.chat.include_usage,
                // A Mistral stand-in reports usage on its finish chunk, as Mistral does.
                self.state.checks.reject_stream_options,
            ),
            Route::Anthropic => anthropic::stream_events(reply),
            Route::Gemini { sse, .. } => {
                let mut chunks = gemini::stream_chunks(reply);
                if omit_final {
                    chunks.pop();
                }
                return gemini::frame(chunks, *sse);
            }
        };
        if omit_final {
            events.pop();
        }
        events
    }

    fn json(&self, reply: &Reply) -> Bytes {
        match self.format() {
            Format::OpenAi => openai::completion_json(reply),
            Format::Anthropic => anthropic::message_json(reply),
            Format::Gemini => gemini::response_json(reply),
        }
    }

    fn stream_content_type(&self) -> &'static str {
        match self.route {
            Route::OpenAi | Route::Anthropic => "text/event-stream; charset=utf-8",
            Route::Gemini { sse: true, .. } => "text/event-stream",
            Route::Gemini { sse: false, .. } => "application/json; charset=UTF-8",
        }
    }

    fn json_content_type(&self) -> &'static str {
        match self.format() {
            Format::Gemini => "application/json; charset=UTF-8",
            _ => "application/json",
        }
    }

    /// The provider's identifying headers.
    fn finish_headers(&self, reply: &Reply, resp: &mut Response<MockBody>) {
        let h = resp.headers_mut();
        match self.format() {
            Format::OpenAi => {
                let id = reply.id.strip_prefix("chatcmpl-").unwrap_or(&reply.id);
                if let Ok(v) = HeaderValue::from_str(&format!("req_{id}")) {
                    h.insert("x-request-id", v);
                }
                h.insert("openai-processing-ms", HeaderValue::from_static("1"));
            }
            Format::Anthropic => {
                let id = reply.id.strip_prefix("msg_").unwrap_or(&reply.id);
                if let Ok(v) = HeaderValue::from_str(&format!("req_{id}")) {
                    h.insert("request-id", v);
                }
            }
            Format::Gemini => {
                h.insert("server-timing", HeaderValue::from_static("gfet4t7; dur=1"));
            }
        }
    }

    fn stream_response(
        &self,
        steps: Vec<Piece>,
        delay: Duration,
        end: BodyEnd,
        gated: bool,
    ) -> Response<MockBody> {
        let gates = gated.then(|| self.state.gates.clone());
        let mut resp = Response::new(MockBody::steps(steps, gates, delay, end));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(self.stream_content_type()),
        );
        resp.headers_mut()
            .insert("cache-control", HeaderValue::from_static("no-cache"));
        resp
    }

    /// The response for a reply: JSON or a stream per the request, shaped by `shape`.
    fn respond(&self, reply: &Reply, chunk_delay_ms: u64, shape: Shape) -> Response<MockBody> {
        let delay = Duration::from_millis(chunk_delay_ms);
        let gates = shape.pause_after.map(|_| self.state.gates.clone());
        let mut resp = if self.streams() {
            let events = self.events(reply, shape.omit_done);
            let events = match shape.cut {
                Some(cut) => cut_events(events, cut),
                None => events,
            };
            let steps = with_gate(events, shape.pause_after);
            self.stream_response(steps, delay, shape.end, shape.pause_after.is_some())
        } else {
            let json = self.json(reply);
            let body = match (shape.cut, shape.pause_after) {
                (None, None) => MockBody::full(json),
                (Some(cut), _) => MockBody::pieces(cut_json(&json, cut), delay, shape.end)
                    .announcing(json.len() as u64),
                (None, Some(after)) => {
                    // Paused JSON: the head (0), or the head and the first half (1 or more).
                    let pieces = if after == 0 {
                        vec![json.clone()]
                    } else {
                        let half = json.len() / 2;
                        vec![json.slice(..half), json.slice(half..)]
                    };
                    MockBody::steps(
                        with_gate(pieces, Some(after.min(1))),
                        gates,
                        delay,
                        shape.end,
                    )
                    .announcing(json.len() as u64)
                }
            };
            let mut resp = Response::new(body);
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(self.json_content_type()),
            );
            resp
        };
        self.finish_headers(reply, &mut resp);
        resp
    }

    /// `after_chunks` events (never the final one), then the provider's mid-stream error, then
    /// a clean end. A JSON request gets the error as an error status.
    fn stream_error(
        &self,
        reply: &Reply,
        after_chunks: usize,
        message: Option<&str>,
        error_type: Option<&str>,
        chunk_delay_ms: u64,
    ) -> Response<MockBody> {
        let format = self.format();
        if !self.streams() {
            let (code, body) = match format {
                Format::OpenAi => (
                    500,
                    openai::error_json(
                        message.unwrap_or(OPENAI_SERVER_ERROR),
                        error_type.unwrap_or("server_error"),
                        None,
                        None,
                    ),
                ),
                Format::Anthropic => {
                    let kind = error_type.unwrap_or("overloaded_error");
                    (
                        anthropic::status_for_error_type(kind),
                        anthropic::error_json(kind, message.unwrap_or("Overloaded")),
                    )
                }
                Format::Gemini => {
                    let status = error_type.unwrap_or("INTERNAL");
                    let chunk =
                        gemini::stream_error_chunk(status, message.unwrap_or(GEMINI_INTERNAL));
                    (gemini::code_of_status(status), Bytes::from(chunk))
                }
            };
            let mut resp = match format {
                Format::Gemini => gemini_response(status_code(code), body),
                _ => json_response(status_code(code), body),
            };
            self.finish_headers(reply, &mut resp);
            return resp;
        }
        let mut events: Vec<Bytes> = match self.route {
            Route::Gemini { sse, .. } => {
                let mut chunks = gemini::stream_chunks(reply);
                let keep = after_chunks.min(chunks.len().saturating_sub(1));
                chunks.truncate(keep);
                chunks.push(gemini::stream_error_chunk(
                    error_type.unwrap_or("INTERNAL"),
                    message.unwrap_or(GEMINI_INTERNAL),
                ));
                gemini::frame(chunks, *sse)
            }
            _ => {
                let mut events = self.events(reply, false);
                let keep = after_chunks.min(events.len().saturating_sub(1));
                events.truncate(keep);
                events
            }
        };
        match format {
            Format::OpenAi => events.push(openai::stream_error_event(
                message.unwrap_or(OPENAI_SERVER_ERROR),
                error_type.unwrap_or("server_error"),
            )),
            Format::Anthropic => events.push(anthropic::error_event(
                error_type.unwrap_or("overloaded_error"),
                message.unwrap_or("Overloaded"),
            )),
            Format::Gemini => {}
        }
        let steps = with_gate(events, None);
        let mut resp = self.stream_response(
            steps,
            Duration::from_millis(chunk_delay_ms),
            BodyEnd::Finish,
            false,
        );
        self.finish_headers(reply, &mut resp);
        resp
    }
}

const OPENAI_SERVER_ERROR: &str =
    "The server had an error while processing your request. Sorry about that!";
const GEMINI_INTERNAL: &str = "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting";

/// How much of a reply is sent and how the body ends.
struct Shape {
    /// `None`: all of it.
    cut: Option<Cut>,
    /// Wait for a release after this many pieces.
    pause_after: Option<usize>,
    /// Leave out the final event (streams).
    omit_done: bool,
    end: BodyEnd,
}

impl Shape {
    fn whole() -> Self {
        Shape {
            cut: None,
            pause_after: None,
            omit_done: false,
            end: BodyEnd::Finish,
        }
    }
}

/// The first `n` bytes of `pieces`, keeping piece boundaries (the last piece may be cut).
fn first_bytes(pieces: Vec<Bytes>, mut n: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    for piece in pieces {
        if n == 0 {
            break;
        }
        let take = piece.len().min(n);
        n -= take;
        out.push(piece.slice(..take));
    }
    out
}

/// What a cut leaves of a stream's events.
fn cut_events(events: Vec<Bytes>, cut: Cut) -> Vec<Bytes> {
    let total: usize = events.iter().map(Bytes::len).sum();
    if let Some(n) = cut.after_bytes {
        return first_bytes(events, n.min(total.saturating_sub(1)));
    }
    let whole = if cut.before_done {
        events.len().saturating_sub(1)
    } else {
        cut.after_chunks.min(events.len())
    };
    let next = events.get(whole).cloned();
    let mut out: Vec<Bytes> = events.into_iter().take(whole).collect();
    if let (true, Some(next)) = (cut.mid_event, next) {
        out.push(next.slice(..(next.len() / 2).max(1)));
    }
    out
}

/// What a cut leaves of a JSON answer.
fn cut_json(json: &Bytes, cut: Cut) -> Vec<Bytes> {
    let keep = match cut.after_bytes {
        Some(n) => n.min(json.len().saturating_sub(1)),
        None if cut.after_chunks == 0 => 0,
        None => json.len() / 2,
    };
    first_bytes(vec![json.clone()], keep)
}

/// The pieces with a gate after the first `after` of them (if any).
fn with_gate(pieces: Vec<Bytes>, after: Option<usize>) -> Vec<Piece> {
    let mut out: Vec<Piece> = pieces.into_iter().map(Piece::Data).collect();
    if let Some(n) = after {
        out.insert(n.min(out.len()), Piece::Gate);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
