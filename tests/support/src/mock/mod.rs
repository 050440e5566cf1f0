//! The mock provider: a loopback HTTP/1.1 server (keep-alive, TCP_NODELAY) that answers like an
//! OpenAI-compatible provider, Anthropic's Messages API or Google's Gemini API, with scripted
//! misbehaviour for tests.
//!
//! Routes (any prefix, since providers mount their API under different paths):
//! - `POST …/chat/completions`: OpenAI chat completions, `Authorization: Bearer <key>`.
//! - `POST …/messages`: Anthropic Messages, `x-api-key: <key>` (or `Authorization: Bearer <key>`,
//!   as the anthropic Python SDK 2.14 sends it) and an `anthropic-version` header.
//! - `POST …/models/{model}:generateContent`, `POST …/models/{model}:streamGenerateContent`
//!   (`?alt=sse`: server-sent events, else one streamed JSON array): Gemini, `x-goog-api-key:
//!   <key>` or `?key=<key>`.
//! - `GET …/models`: the model list, in the format the credentials name (`x-api-key`: Anthropic;
//!   `x-goog-api-key` or `?key=`: Gemini; else OpenAI).
//! - `POST /_mock/script` (a list of [`Behaviour`]s, or one), `POST /_mock/reset`,
//!   `GET /_mock/requests` (every chat request received, whatever its format; `?kind=chat`,
//!   `anthropic` or `gemini`: those of one format; `?all=1`: every request to the provider API,
//!   model listings and unknown paths included), `GET /_mock/script` (what is left).
//! - `POST /_mock/rules` (a list of [`Rule`]s, or one): replaces the standing rules, which are
//!   consulted before the script (per model and/or request text, optionally for N requests);
//!   `GET /_mock/rules`: those left (with the uses left in `times`). `POST /_mock/reset` clears
//!   them too.
//! - `POST /_mock/release` (body optional: `{"count": N}`, default 1): lets N answers paused by
//!   `pause_after_chunks` go on (a release sent before the answer reaches its pause is kept);
//!   `GET /_mock/paused`: `{"paused": N}`, answers waiting at their pause right now.
//!
//! The engine ([`answer`]) decides what to answer and when; [`crate::wire`] renders it.

mod answer;
mod args;
mod body;
mod script;

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

pub use args::plausible as plausible_arguments;
pub use body::{BodyEnd, Gates, MockBody, Piece};
pub use script::{parse_rules, parse_script, take_rule, Behaviour, Cut, Finish, Rule};

use crate::wire::{anthropic, gemini, openai, Checks, Format, Reply};

/// How a mock provider is set up.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Shown in replies: `mock(<name>): …`, and as the models' `owned_by`.
    pub name: String,
    /// The provider keys the mock accepts (any of them), sent the way each format sends keys.
    pub api_keys: Vec<String>,
    pub listen: SocketAddr,
    /// Benchmark fast path: non-streaming OpenAI requests get one precomputed reply, the body is
    /// not parsed, nothing is recorded and no script applies.
    pub fixed: bool,
    /// Record chat requests for `GET /_mock/requests`.
    pub record: bool,
    /// At most this many requests are kept (oldest dropped first).
    pub max_recorded: usize,
    /// Served by `GET …/models`.
    pub models: Vec<String>,
    /// Anthropic: reject a conversation that ends with an assistant message (as newer Claude
    /// models do).
    pub reject_prefill: bool,
    /// OpenAI: answer 422 to any `stream_options` (as Mistral does).
    pub reject_stream_options: bool,
}

impl MockConfig {
    /// A mock on `127.0.0.1:<any free port>` accepting one key.
    pub fn new(name: impl Into<String>, api_key: impl Into<String>) -> Self {
        MockConfig {
            name: name.into(),
            api_keys: vec![api_key.into()],
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            fixed: false,
            record: true,
            max_recorded: 10_000,
            models: vec!["mock-small".into(), "mock-large".into()],
            reject_prefill: false,
            reject_stream_options: false,
        }
    }

    /// Accepts these keys (any of them) instead.
    pub fn with_keys(mut self, keys: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.api_keys = keys.into_iter().map(Into::into).collect();
        self
    }

    fn checks(&self) -> Checks {
        Checks {
            reject_prefill: self.reject_prefill,
            reject_stream_options: self.reject_stream_options,
        }
    }

    fn accepts(&self, key: &str) -> bool {
        self.api_keys.iter().any(|k| k == key)
    }
}

/// A provider-API request as the mock received it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    /// `chat` (OpenAI), `anthropic`, `gemini`, `models` or `other` (any other path, wrong method
    /// included).
    pub kind: String,
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub query: Option<String>,
    /// Lower-case names; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// When the request was received (its body read), Unix milliseconds.
    #[serde(default)]
    pub at_ms: u64,
    /// The parsed JSON body (`null` if it was not JSON; see `body_text`).
    pub body: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_text: Option<String>,
}

impl RecordedRequest {
    /// A chat request of any format.
    pub fn is_chat(&self) -> bool {
        Format::CHAT_KINDS.contains(&self.kind.as_str())
    }
}

/// Which requests `GET /_mock/requests` lists.
#[derive(Debug, Clone, PartialEq)]
enum Listing {
    Chat,
    All,
    Kind(String),
}

struct State {
    config: MockConfig,
    checks: Checks,
    fixed_reply: FixedReplies,
    script: Mutex<VecDeque<Behaviour>>,
    rules: Mutex<Vec<Rule>>,
    requests: Mutex<VecDeque<RecordedRequest>>,
    seq: AtomicU64,
    gates: Gates,
}

impl State {
    fn reset(&self) {
        self.script.lock().unwrap().clear();
        self.rules.lock().unwrap().clear();
        self.requests.lock().unwrap().clear();
        self.gates.clear();
    }

    fn recorded(&self, listing: &Listing) -> Vec<RecordedRequest> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| match listing {
                Listing::Chat => r.is_chat(),
                Listing::All => true,
                Listing::Kind(k) => &r.kind == k,
            })
            .cloned()
            .collect()
    }

    /// What to do with a chat request for `model` with this raw `body`: the first matching rule,
    /// else the next scripted behaviour, else a normal answer.
    fn next_behaviour(&self, model: &str, body: &[u8]) -> Behaviour {
        if self.config.fixed {
            return Behaviour::ok();
        }
        if let Some(b) = take_rule(&mut self.rules.lock().unwrap(), model, body) {
            return b;
        }
        self.script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(Behaviour::ok)
    }
}

/// The benchmark fast path's precomputed answers, one per wire format.
pub(crate) struct FixedReplies {
    pub(crate) openai: Bytes,
    pub(crate) anthropic: Bytes,
    pub(crate) gemini: Bytes,
}

/// Starts mock providers.
pub struct MockProvider;

impl MockProvider {
    /// Binds `config.listen` and serves on the current tokio runtime until the handle drops.
    pub async fn start(config: MockConfig) -> io::Result<MockHandle> {
        if config.api_keys.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the mock needs at least one API key",
            ));
        }
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let fixed = Reply::text(
            "chatcmpl-mockfixed",
            "mock-fixed",
            &format!("mock({}): fixed", config.name),
            1,
        );
        let fixed_reply = FixedReplies {
            openai: openai::completion_json(&fixed),
            anthropic: crate::wire::anthropic::message_json(&fixed),
            gemini: crate::wire::gemini::response_json(&fixed),
        };
        let state = Arc::new(State {
            checks: config.checks(),
            config,
            fixed_reply,
            script: Mutex::new(VecDeque::new()),
            rules: Mutex::new(Vec::new()),
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

    /// Replaces the standing rules (consulted before the script).
    pub fn set_rules(&self, rules: impl IntoIterator<Item = Rule>) {
        *self.state.rules.lock().unwrap() = rules.into_iter().collect();
    }

    /// The standing rules left.
    pub fn rules(&self) -> Vec<Rule> {
        self.state.rules.lock().unwrap().clone()
    }

    /// Clears the script, the rules, the recorded requests and unused releases.
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

    /// Every chat request received so far, whatever its format.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.recorded(&Listing::Chat)
    }

    /// The requests recorded with this `kind` (`chat`, `anthropic`, `gemini`, `models`, `other`).
    pub fn requests_of(&self, kind: &str) -> Vec<RecordedRequest> {
        self.state.recorded(&Listing::Kind(kind.to_string()))
    }

    /// Every request to the provider API (chat, models, unknown paths) received so far.
    pub fn all_requests(&self) -> Vec<RecordedRequest> {
        self.state.recorded(&Listing::All)
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

fn status_code(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
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

/// A chat route and what its path says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Route {
    OpenAi,
    Anthropic,
    Gemini {
        model: String,
        stream: bool,
        /// `alt=sse`: server-sent events; else a streamed JSON array.
        sse: bool,
    },
}

impl Route {
    fn format(&self) -> Format {
        match self {
            Route::OpenAi => Format::OpenAi,
            Route::Anthropic => Format::Anthropic,
            Route::Gemini { .. } => Format::Gemini,
        }
    }
}

/// The value of `name` in a query string.
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|p| p.split_once('=').or(Some((p, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `…/models/{model}:generateContent` or `:streamGenerateContent`.
fn gemini_route(path: &str, query: Option<&str>) -> Option<Route> {
    let at = path.rfind("/models/")?;
    let rest = &path[at + "/models/".len()..];
    // The colon may come percent-encoded.
    let (model, method) = rest
        .rsplit_once(':')
        .or_else(|| rest.rsplit_once("%3A"))
        .or_else(|| rest.rsplit_once("%3a"))?;
    if model.is_empty() {
        return None;
    }
    let stream = match method {
        "generateContent" => false,
        "streamGenerateContent" => true,
        _ => return None,
    };
    Some(Route::Gemini {
        model: model.to_string(),
        stream,
        sse: stream && query_param(query, "alt") == Some("sse"),
    })
}

async fn serve(state: Arc<State>, req: Request<Incoming>) -> Result<Response<MockBody>, io::Error> {
    let path = req.uri().path();
    if let Some(action) = path.strip_prefix("/_mock/") {
        let action = action.to_string();
        return Ok(control(&state, &action, req).await);
    }
    let route = if path.ends_with("/chat/completions") {
        Some(Route::OpenAi)
    } else if path.ends_with("/messages") {
        Some(Route::Anthropic)
    } else {
        gemini_route(path, req.uri().query())
    };
    if let Some(route) = route {
        if req.method() != Method::POST {
            if state.config.record {
                record_head(&state, "other", &req);
            }
            return Ok(wrong_method(&req, &route));
        }
        return answer::chat(&state, route, req).await;
    }
    if path.ends_with("/models") {
        if state.config.record {
            record_head(&state, "models", &req);
        }
        return Ok(models(&state, &req));
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

fn wrong_method(req: &Request<Incoming>, route: &Route) -> Response<MockBody> {
    let status = StatusCode::METHOD_NOT_ALLOWED;
    match route {
        Route::OpenAi => invalid_url(req, status),
        Route::Anthropic => json_response(
            status,
            anthropic::error_json(
                "invalid_request_error",
                &format!("Method Not Allowed: {} {}", req.method(), req.uri().path()),
            ),
        ),
        Route::Gemini { .. } => json_response(
            status,
            gemini::error_json(405, "Method Not Allowed (mock)."),
        ),
    }
}

fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Checks a request's credentials the way its format sends them; `Err` is the provider's own
/// answer (OpenAI 401; Anthropic 401, or 400 without `anthropic-version`; Gemini 403 without a
/// key, 400 `API_KEY_INVALID` with a wrong one).
fn authenticate(
    state: &State,
    format: Format,
    headers: &http::HeaderMap,
    query: Option<&str>,
) -> Result<(), Box<Response<MockBody>>> {
    let config = &state.config;
    match format {
        Format::OpenAi => {
            let ok = header(headers, AUTHORIZATION.as_str())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|k| config.accepts(k));
            if ok {
                Ok(())
            } else {
                Err(Box::new(openai_unauthorized()))
            }
        }
        Format::Anthropic => {
            // `x-api-key`, or (as the anthropic Python SDK 2.14 sends keys, so the
            // API accepts) `Authorization: Bearer <key>`.
            let key = header(headers, "x-api-key").or_else(|| {
                header(headers, AUTHORIZATION.as_str()).and_then(|v| v.strip_prefix("Bearer "))
            });
            let ok = key.is_some_and(|k| config.accepts(k));
            if !ok {
                return Err(Box::new(json_response(
                    StatusCode::UNAUTHORIZED,
                    anthropic::error_json("authentication_error", "invalid x-api-key"),
                )));
            }
            if headers.get(anthropic::VERSION_HEADER).is_none() {
                return Err(Box::new(json_response(
                    StatusCode::BAD_REQUEST,
                    anthropic::error_json(
                        "invalid_request_error",
                        "anthropic-version: header is required",
                    ),
                )));
            }
            Ok(())
        }
        Format::Gemini => {
            let key = header(headers, "x-goog-api-key").or_else(|| query_param(query, "key"));
            match key {
                Some(k) if config.accepts(k) => Ok(()),
                Some(_) => Err(Box::new(gemini_response(
                    StatusCode::BAD_REQUEST,
                    gemini::bad_key_json(),
                ))),
                None => Err(Box::new(gemini_response(
                    StatusCode::FORBIDDEN,
                    gemini::no_key_json(),
                ))),
            }
        }
    }
}

fn gemini_response(status: StatusCode, body: Bytes) -> Response<MockBody> {
    let mut resp = json_response(status, body);
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    resp
}

fn openai_unauthorized() -> Response<MockBody> {
    openai_error(
        StatusCode::UNAUTHORIZED,
        "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
        "invalid_request_error",
        None,
        Some("invalid_api_key"),
    )
}

/// `GET …/models`, in the format the credentials point to.
fn models(state: &State, req: &Request<Incoming>) -> Response<MockBody> {
    let headers = req.headers();
    let query = req.uri().query();
    let format = if headers.contains_key("x-api-key") || headers.contains_key("anthropic-version") {
        Format::Anthropic
    } else if headers.contains_key("x-goog-api-key") || query_param(query, "key").is_some() {
        Format::Gemini
    } else {
        Format::OpenAi
    };
    if req.method() != Method::GET {
        return invalid_url(req, StatusCode::METHOD_NOT_ALLOWED);
    }
    if let Err(resp) = authenticate(state, format, headers, query) {
        return *resp;
    }
    let models = &state.config.models;
    match format {
        Format::OpenAi => json_response(
            StatusCode::OK,
            openai::models_json(models, &state.config.name),
        ),
        Format::Anthropic => json_response(StatusCode::OK, anthropic::models_json(models)),
        Format::Gemini => gemini_response(StatusCode::OK, gemini::models_json(models)),
    }
}

async fn control(state: &State, action: &str, req: Request<Incoming>) -> Response<MockBody> {
    let method = req.method().clone();
    let query = req.uri().query().map(str::to_string);
    let listing = match (
        query_param(query.as_deref(), "all"),
        query_param(query.as_deref(), "kind"),
    ) {
        (Some("" | "1" | "true"), _) => Listing::All,
        (_, Some(kind)) if !kind.is_empty() => Listing::Kind(kind.to_string()),
        _ => Listing::Chat,
    };
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
        (Method::POST, "rules") => match parse_rules(&body) {
            Ok(rules) => {
                let count = rules.len();
                *state.rules.lock().unwrap() = rules;
                json_response(
                    StatusCode::OK,
                    Bytes::from(serde_json::json!({ "rules": count }).to_string()),
                )
            }
            Err(e) => openai_error(
                StatusCode::BAD_REQUEST,
                &format!("bad rules: {e}"),
                "invalid_request_error",
                None,
                None,
            ),
        },
        (Method::GET, "rules") => {
            let rules = state.rules.lock().unwrap().clone();
            json_response(
                StatusCode::OK,
                Bytes::from(serde_json::to_vec(&rules).expect("rules serialise")),
            )
        }
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
            let requests = state.recorded(&listing);
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

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
            at_ms: now_ms(),
            body: Value::Null,
            body_text: None,
        },
    );
}

/// Records a chat request of any format.
fn record(
    state: &State,
    format: Format,
    parts: &http::request::Parts,
    body: &Bytes,
    parsed: Option<&Value>,
) {
    let entry = RecordedRequest {
        kind: format.kind().to_string(),
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: header_map(&parts.headers),
        at_ms: now_ms(),
        body: parsed.cloned().unwrap_or(Value::Null),
        body_text: match parsed {
            Some(_) => None,
            None => Some(String::from_utf8_lossy(body).into_owned()),
        },
    };
    push_record(state, entry);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemini_paths() {
        assert_eq!(
            gemini_route(
                "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
                Some("alt=sse&key=k")
            ),
            Some(Route::Gemini {
                model: "gemini-2.5-flash".into(),
                stream: true,
                sse: true
            })
        );
        assert_eq!(
            gemini_route("/x/v1/models/m:generateContent", None),
            Some(Route::Gemini {
                model: "m".into(),
                stream: false,
                sse: false
            })
        );
        assert_eq!(
            gemini_route("/v1beta/models/m%3AgenerateContent", None),
            Some(Route::Gemini {
                model: "m".into(),
                stream: false,
                sse: false
            })
        );
        assert_eq!(gemini_route("/v1beta/models/m:countTokens", None), None);
        assert_eq!(gemini_route("/v1beta/models", None), None);
    }

    #[test]
    fn query_params() {
        assert_eq!(query_param(Some("a=1&key=xyz"), "key"), Some("xyz"));
        assert_eq!(query_param(Some("all"), "all"), Some(""));
        assert_eq!(query_param(None, "all"), None);
    }
}
