//! The mock provider: a loopback HTTP/1.1 server (keep-alive, TCP_NODELAY) that answers like an
//! OpenAI-compatible provider, with scripted misbehaviour for tests.
//!
//! Routes (any prefix, since providers mount their API under different paths):
//! - `POST …/chat/completions`, `GET …/models`: the provider API, `Authorization: Bearer <key>`.
//! - `POST /_mock/script` (a list of [`Behaviour`]s, or one), `POST /_mock/reset`,
//!   `GET /_mock/requests` (every chat request received; `?all=1`: every request to the
//!   provider API, model listings and unknown paths included), `GET /_mock/script` (what is left).
//! - `POST /_mock/release` (body optional: `{"count": N}`, default 1): lets N answers paused by
//!   `pause_after_chunks` go on (a release sent before the answer reaches its pause is kept);
//!   `GET /_mock/paused`: `{"paused": N}`, answers waiting at their pause right now.
//!
//! The engine here decides what to answer and when; [`crate::wire`] renders it.

mod body;
mod script;

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use body::{BodyEnd, Gates, MockBody, Piece};
pub use script::{parse_script, Behaviour, Cut};

use crate::wire::openai::{self, ChatRequest};
use crate::wire::{Reply, ReplyBody, ToolCall};

/// How a mock provider is set up.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Shown in replies: `mock(<name>): …`, and as the models' `owned_by`.
    pub name: String,
    /// The provider key the mock requires as `Authorization: Bearer <key>`.
    pub api_key: String,
    pub listen: SocketAddr,
    /// Benchmark fast path: non-streaming requests get one precomputed reply, the body is not
    /// parsed, nothing is recorded and no script applies.
    pub fixed: bool,
    /// Record chat requests for `GET /_mock/requests`.
    pub record: bool,
    /// At most this many requests are kept (oldest dropped first).
    pub max_recorded: usize,
    /// Served by `GET …/models`.
    pub models: Vec<String>,
}

impl MockConfig {
    /// A mock on `127.0.0.1:<any free port>`.
    pub fn new(name: impl Into<String>, api_key: impl Into<String>) -> Self {
        MockConfig {
            name: name.into(),
            api_key: api_key.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            fixed: false,
            record: true,
            max_recorded: 10_000,
            models: vec!["mock-small".into(), "mock-large".into()],
        }
    }
}

/// A provider-API request as the mock received it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// `chat`, `models` or `other` (any other path, wrong method included).
    pub kind: String,
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub query: Option<String>,
    /// Lower-case names; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The parsed JSON body (`null` if it was not JSON; see `body_text`).
    pub body: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_text: Option<String>,
}

struct State {
    config: MockConfig,
    expected_auth: Vec<u8>,
    fixed_reply: Bytes,
    script: Mutex<VecDeque<Behaviour>>,
    requests: Mutex<VecDeque<RecordedRequest>>,
    seq: AtomicU64,
    gates: Gates,
}

impl State {
    fn reset(&self) {
        self.script.lock().unwrap().clear();
        self.requests.lock().unwrap().clear();
        self.gates.clear();
    }

    fn recorded(&self, all: bool) -> Vec<RecordedRequest> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| all || r.kind == "chat")
            .cloned()
            .collect()
    }
}

/// Starts mock providers.
pub struct MockProvider;

impl MockProvider {
    /// Binds `config.listen` and serves on the current tokio runtime until the handle drops.
    pub async fn start(config: MockConfig) -> io::Result<MockHandle> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let fixed_reply = openai::completion_json(&Reply {
            id: "chatcmpl-mockfixed".into(),
            created: 1_700_000_000,
            model: "mock-fixed".into(),
            body: ReplyBody::Text(format!("mock({}): fixed", config.name)),
            prompt_tokens: 1,
            completion_tokens: 2,
        });
        let state = Arc::new(State {
            expected_auth: format!("Bearer {}", config.api_key).into_bytes(),
            config,
            fixed_reply,
            script: Mutex::new(VecDeque::new()),
            requests: Mutex::new(VecDeque::new()),
            seq: AtomicU64::new(1),
            gates: Gates::default(),
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(MockHandle { addr, state, task })
    }
}

/// A running mock. Dropping it stops accepting connections.
pub struct MockHandle {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl MockHandle {
    /// `http://127.0.0.1:PORT` (the origin; no path).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Appends behaviours to the script.
    pub fn push_script(&self, behaviours: impl IntoIterator<Item = Behaviour>) {
        self.state.script.lock().unwrap().extend(behaviours);
    }

    /// Clears the script, the recorded requests and unused releases.
    pub fn reset(&self) {
        self.state.reset();
    }

    /// Lets `n` paused answers go on (see `pause_after_chunks`).
    pub fn release(&self, n: usize) {
        self.state.gates.release(n);
    }

    /// Answers waiting at their pause right now.
    pub fn paused(&self) -> usize {
        self.state.gates.waiting()
    }

    /// Every chat request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.recorded(false)
    }

    /// Every request to the provider API (chat, models, unknown paths) received so far.
    pub fn all_requests(&self) -> Vec<RecordedRequest> {
        self.state.recorded(true)
    }

    /// Waits until the process is asked to stop (Ctrl-C); used by the binary.
    pub async fn serve_forever(self) {
        let _ = tokio::signal::ctrl_c().await;
        drop(self);
    }
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| serve(state.clone(), req));
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<MockBody> {
    let mut resp = Response::new(MockBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn openai_error(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Response<MockBody> {
    json_response(status, openai::error_json(message, kind, param, code))
}

/// The error a service returns to make hyper close the connection without answering.
fn close_connection() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "mock: closed by script")
}

async fn serve(state: Arc<State>, req: Request<Incoming>) -> Result<Response<MockBody>, io::Error> {
    let path = req.uri().path();
    if let Some(action) = path.strip_prefix("/_mock/") {
        let action = action.to_string();
        return Ok(control(&state, &action, req).await);
    }
    if path.ends_with("/chat/completions") {
        if req.method() != Method::POST {
            if state.config.record {
                record_head(&state, "other", &req);
            }
            return Ok(invalid_url(&req, StatusCode::METHOD_NOT_ALLOWED));
        }
        return chat(&state, req).await;
    }
    if path.ends_with("/models") {
        if state.config.record {
            record_head(&state, "models", &req);
        }
        if req.method() != Method::GET {
            return Ok(invalid_url(&req, StatusCode::METHOD_NOT_ALLOWED));
        }
        if !authorized(&state, &req) {
            return Ok(unauthorized());
        }
        return Ok(json_response(
            StatusCode::OK,
            openai::models_json(&state.config.models, &state.config.name),
        ));
    }
    if state.config.record {
        record_head(&state, "other", &req);
    }
    Ok(invalid_url(&req, StatusCode::NOT_FOUND))
}

fn invalid_url(req: &Request<Incoming>, status: StatusCode) -> Response<MockBody> {
    openai_error(
        status,
        &format!("Invalid URL ({} {})", req.method(), req.uri().path()),
        "invalid_request_error",
        None,
        None,
    )
}

fn authorized(state: &State, req: &Request<Incoming>) -> bool {
    req.headers()
        .get(AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == state.expected_auth.as_slice())
}

fn unauthorized() -> Response<MockBody> {
    openai_error(
        StatusCode::UNAUTHORIZED,
        "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    )
}

async fn control(state: &State, action: &str, req: Request<Incoming>) -> Response<MockBody> {
    let method = req.method().clone();
    let all = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|p| p == "all" || p == "all=1" || p == "all=true")
    });
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    match (method, action) {
        (Method::POST, "script") => match parse_script(&body) {
            Ok(behaviours) => {
                let mut script = state.script.lock().unwrap();
                script.extend(behaviours);
                let queued = script.len();
                json_response(
                    StatusCode::OK,
                    Bytes::from(serde_json::json!({ "queued": queued }).to_string()),
                )
            }
            Err(e) => openai_error(
                StatusCode::BAD_REQUEST,
                &format!("bad script: {e}"),
                "invalid_request_error",
                None,
                None,
            ),
        },
        (Method::GET, "script") => {
            let script: Vec<Behaviour> = state.script.lock().unwrap().iter().cloned().collect();
            json_response(
                StatusCode::OK,
                Bytes::from(serde_json::to_vec(&script).expect("script serialises")),
            )
        }
        (Method::POST, "reset") => {
            state.reset();
            json_response(StatusCode::OK, Bytes::from_static(b"{\"ok\":true}"))
        }
        (Method::POST, "release") => {
            let count = if body.iter().all(u8::is_ascii_whitespace) {
                Some(1)
            } else {
                serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("count").and_then(Value::as_u64))
            };
            match count {
                Some(n) => {
                    state.gates.release(n as usize);
                    json_response(
                        StatusCode::OK,
                        Bytes::from(serde_json::json!({ "released": n }).to_string()),
                    )
                }
                None => openai_error(
                    StatusCode::BAD_REQUEST,
                    "release takes no body or {\"count\": N}",
                    "invalid_request_error",
                    None,
                    None,
                ),
            }
        }
        (Method::GET, "paused") => json_response(
            StatusCode::OK,
            Bytes::from(serde_json::json!({ "paused": state.gates.waiting() }).to_string()),
        ),
        (Method::GET, "requests") => {
            let requests = state.recorded(all);
            json_response(
                StatusCode::OK,
                Bytes::from(serde_json::to_vec(&requests).expect("requests serialise")),
            )
        }
        _ => openai_error(
            StatusCode::NOT_FOUND,
            &format!("unknown control route /_mock/{action}"),
            "invalid_request_error",
            None,
            None,
        ),
    }
}

fn header_map(headers: &http::HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    out
}

fn push_record(state: &State, entry: RecordedRequest) {
    let mut requests = state.requests.lock().unwrap();
    if requests.len() >= state.config.max_recorded.max(1) {
        requests.pop_front();
    }
    requests.push_back(entry);
}

/// Records a non-chat request (its body is not read).
fn record_head(state: &State, kind: &str, req: &Request<Incoming>) {
    push_record(
        state,
        RecordedRequest {
            kind: kind.to_string(),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            query: req.uri().query().map(str::to_string),
            headers: header_map(req.headers()),
            body: Value::Null,
            body_text: None,
        },
    );
}

fn record(state: &State, parts: &http::request::Parts, body: &Bytes, parsed: Option<&Value>) {
    let entry = RecordedRequest {
        kind: "chat".to_string(),
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: header_map(&parts.headers),
        body: parsed.cloned().unwrap_or(Value::Null),
        body_text: match parsed {
            Some(_) => None,
            None => Some(String::from_utf8_lossy(body).into_owned()),
        },
    };
    push_record(state, entry);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn chat(state: &State, req: Request<Incoming>) -> Result<Response<MockBody>, io::Error> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    let is_authorized = parts
        .headers
        .get(AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == state.expected_auth.as_slice());

    if state.config.fixed && is_authorized && !contains(&body, b"\"stream\"") {
        let mut resp = json_response(StatusCode::OK, state.fixed_reply.clone());
        resp.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("req_mockfixed"));
        return Ok(resp);
    }

    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    if state.config.record {
        record(state, &parts, &body, parsed.as_ref());
    }
    if !is_authorized {
        return Ok(unauthorized());
    }
    let chat = match parsed {
        Some(value) => openai::request_from_value(&value),
        None => openai::parse_request(&body),
    };
    let chat = match chat {
        Ok(c) => c,
        Err(e) => {
            return Ok(openai_error(
                StatusCode::BAD_REQUEST,
                &e.message,
                "invalid_request_error",
                e.param.as_deref(),
                None,
            ))
        }
    };

    let behaviour = if state.config.fixed {
        None
    } else {
        state.script.lock().unwrap().pop_front()
    }
    .unwrap_or_else(Behaviour::ok);

    match behaviour {
        Behaviour::Ok {
            latency_ms,
            chunk_delay_ms,
            content,
            pause_after_chunks,
            omit_done,
        } => {
            sleep_ms(latency_ms).await;
            let reply = make_reply(state, &chat, content);
            let shape = Shape {
                pause_after: pause_after_chunks,
                omit_done,
                ..Shape::whole()
            };
            Ok(reply_response(state, &reply, &chat, chunk_delay_ms, shape))
        }
        Behaviour::Status {
            status,
            retry_after,
            body,
            headers,
            latency_ms,
        } => {
            sleep_ms(latency_ms).await;
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = match body {
                Some(b) => Bytes::from(b.to_string()),
                None => openai::default_error_for_status(code.as_u16(), &chat.model),
            };
            let mut resp = json_response(code, body);
            let h = resp.headers_mut();
            let retry_after = retry_after.as_ref().map(script::header_text);
            if code == StatusCode::TOO_MANY_REQUESTS {
                let reset = retry_after
                    .as_deref()
                    .and_then(|r| r.parse::<u64>().ok())
                    .map(|s| format!("{s}s"))
                    .unwrap_or_else(|| "1s".into());
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
            let reply = make_reply(state, &chat, None);
            let shape = Shape {
                cut: behaviour.cut(),
                end,
                ..Shape::whole()
            };
            Ok(reply_response(state, &reply, &chat, chunk_delay_ms, shape))
        }
        Behaviour::Close => Err(close_connection()),
    }
}

async fn sleep_ms(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// True if `text` contains `word` as a whole word, ignoring case.
fn has_word(text: &str, word: &str) -> bool {
    text.split(|c: char| !c.is_alphanumeric())
        .any(|w| w.eq_ignore_ascii_case(word))
}

/// The place a weather question asks about: the word after "in", else Paris.
fn weather_location(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .iter()
        .position(|w| w.eq_ignore_ascii_case("in"))
        .and_then(|i| words.get(i + 1))
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()).to_string())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "Paris".into())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn make_reply(state: &State, chat: &ChatRequest, content: Option<String>) -> Reply {
    let n = state.seq.fetch_add(1, Ordering::Relaxed);
    let id = format!("chatcmpl-mock{n:016}");
    let body = match &chat.first_tool {
        Some(tool) if content.is_none() && has_word(&chat.last_user_text, "weather") => {
            let param = tool.first_param.as_deref().unwrap_or("location");
            let mut args = serde_json::Map::new();
            args.insert(
                param.to_string(),
                Value::String(weather_location(&chat.last_user_text)),
            );
            ReplyBody::ToolCall(ToolCall {
                id: format!("call_mock{n:015}"),
                name: tool.name.clone(),
                arguments: Value::Object(args).to_string(),
            })
        }
        _ => ReplyBody::Text(
            content
                .unwrap_or_else(|| format!("mock({}): {}", state.config.name, chat.last_user_text)),
        ),
    };
    let completion_tokens = match &body {
        ReplyBody::Text(t) => openai::count_words(t),
        ReplyBody::ToolCall(c) => openai::count_words(&c.arguments),
    };
    Reply {
        id,
        created: now_secs(),
        model: chat.model.clone(),
        body,
        prompt_tokens: chat.prompt_tokens,
        completion_tokens,
    }
}

/// How much of a reply is sent and how the body ends.
struct Shape {
    /// `None`: all of it.
    cut: Option<Cut>,
    /// Wait for a release after this many pieces.
    pause_after: Option<usize>,
    /// Leave out the `[DONE]` event (streams).
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

/// The response for a reply: JSON or SSE per the request, shaped by `shape`.
fn reply_response(
    state: &State,
    reply: &Reply,
    chat: &ChatRequest,
    chunk_delay_ms: u64,
    shape: Shape,
) -> Response<MockBody> {
    let delay = Duration::from_millis(chunk_delay_ms);
    let gates = shape.pause_after.map(|_| state.gates.clone());
    let mut resp = if chat.stream {
        let mut events = openai::stream_events(reply, chat.include_usage);
        if shape.omit_done {
            events.pop();
        }
        let events = match shape.cut {
            Some(cut) => cut_events(events, cut),
            None => events,
        };
        let steps = with_gate(events, shape.pause_after);
        let mut resp = Response::new(MockBody::steps(steps, gates, delay, shape.end));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        resp.headers_mut()
            .insert("cache-control", HeaderValue::from_static("no-cache"));
        resp
    } else {
        let json = openai::completion_json(reply);
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
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    };
    if let Ok(v) = HeaderValue::from_str(&format!("req_{}", &reply.id["chatcmpl-".len()..])) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp.headers_mut()
        .insert("openai-processing-ms", HeaderValue::from_static("1"));
    resp
}
