//! FreeRelay's API surface as a Spin HTTP component. A thin shell: it reads variables and state
//! once, asks the `freerelay` core what to do, performs the I/O, and writes the outcome back to
//! the key-value store once, after the upstream is done and before the client's body is closed.

mod kv;
mod outbound;

use freerelay::api::{self, Endpoint};
use freerelay::config::{Config, Configured};
use freerelay::cooldown::Cooldown;
use freerelay::error::ApiError;
use freerelay::kv::{keys, Kv};
use freerelay::route::{self, Candidate};
use freerelay::stats::{self, Outcome};
use freerelay::upstream::{self, Failure, Hints};
use freerelay::wire::openai::{ChatRequest, Usage};
use freerelay::wire::sse::SseScanner;
use futures::{SinkExt, StreamExt};
use spin_sdk::http::{
    Fields, IncomingRequest, IncomingResponse, OutgoingResponse, ResponseOutparam,
};
use spin_sdk::http_component;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Upstream error bodies are read up to this size for their message, then dropped.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// JSON answers are also kept up to this size to read their usage; larger ones are still relayed.
const USAGE_BODY_LIMIT: usize = 8 * 1024 * 1024;

#[http_component]
async fn handle(req: IncomingRequest, out: ResponseOutparam) {
    let started = Instant::now();
    let method = req.method().to_string();
    let path = req.path_with_query().unwrap_or_default();
    let endpoint = match api::endpoint(&method, &path) {
        Ok(e) => e,
        Err(e) => return respond_error(out, &e).await,
    };
    if endpoint == Endpoint::Health {
        return respond(
            out,
            200,
            "application/json",
            br#"{"status":"ok"}"#.to_vec(),
            &[],
        )
        .await;
    }
    let config = match load_config() {
        Ok(c) => c,
        Err(e) => {
            log("config_error", &[("message", &e.message)]);
            return respond_error(out, &e).await;
        }
    };
    let headers = req.headers();
    if let Err(e) = freerelay::auth::check(
        &config.client_key_digests,
        header(&headers, "authorization").as_deref(),
    ) {
        return respond_error(out, &e).await;
    }
    match endpoint {
        Endpoint::Models => respond_json(out, api::models_body(&config)).await,
        Endpoint::Model(id) => match api::model_body(&config, &id) {
            Ok(body) => respond_json(out, body).await,
            Err(e) => respond_error(out, &e).await,
        },
        Endpoint::Stats => {
            let report = kv::SpinKv::open_default()
                .and_then(|kv| kv.get_many(&stats::all_keys()))
                .map(|values| stats::report(&values));
            match report {
                Ok(r) => respond_json(out, serde_json::to_vec(&r).unwrap_or_default()).await,
                Err(e) => respond_error(out, &ApiError::internal(e.to_string())).await,
            }
        }
        Endpoint::ChatCompletions => chat(req, headers, out, &config, started).await,
        Endpoint::Health => {}
    }
}

/// Reads every component variable in one host call (`wasi:config/store.get-all`, which Spin
/// implements), rather than one `variables::get` per provider setting.
fn load_config() -> Result<Config, ApiError> {
    match spin_sdk::wit::wasi::config::store::get_all() {
        Ok(all) => {
            let all: std::collections::HashMap<String, String> = all.into_iter().collect();
            Config::from_vars(|name| all.get(name).cloned())
        }
        Err(_) => Config::from_vars(|name| spin_sdk::variables::get(name).ok()),
    }
}

/// State changes decided while serving, written once per request when the upstream is done.
#[derive(Default)]
struct Pending<'a> {
    outcomes: Vec<Outcome<'a>>,
    cooldowns: Vec<(&'a str, Cooldown)>,
}

async fn chat(
    req: IncomingRequest,
    headers: Fields,
    out: ResponseOutparam,
    config: &Config,
    started: Instant,
) {
    let body = match read_body(req, &headers, config.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return respond_error(out, &e).await,
    };
    let request = match ChatRequest::parse(&body) {
        Ok(r) => r,
        Err(e) => return respond_error(out, &e).await,
    };
    let plan = match route::plan(config, &request.model) {
        Ok(p) => p,
        Err(e) => return respond_error(out, &e).await,
    };
    // State is best effort: a store failure must not stop traffic.
    let store = match kv::SpinKv::open_default() {
        Ok(s) => Some(s),
        Err(e) => {
            log("kv_unavailable", &[("error", &e.to_string())]);
            None
        }
    };
    let now = now_ms();
    let cooling = store
        .as_ref()
        .and_then(|s| s.get_many(&plan.cooldown_keys()).ok())
        .unwrap_or_default();
    let plan = match plan.without_cooling(&cooling, now) {
        Ok(p) => p,
        Err(e) => return respond_error(out, &e).await,
    };

    let mut pending = Pending::default();
    let last = plan.candidates.len() - 1;
    for (i, candidate) in plan.candidates.iter().enumerate() {
        let provider = candidate.provider.provider.id;
        match attempt(candidate, &request, config).await {
            Ok(response) => {
                let ok = relay(response, out, candidate, &mut pending, store.as_ref()).await;
                log(
                    "chat",
                    &[
                        ("provider", provider),
                        ("model", &candidate.model),
                        ("ok", if ok { "true" } else { "false" }),
                        ("ms", &started.elapsed().as_millis().to_string()),
                    ],
                );
                return;
            }
            Err(failure) => {
                log(
                    "upstream_failure",
                    &[
                        ("provider", provider),
                        ("status", &failure.error.status.to_string()),
                    ],
                );
                pending.outcomes.push(Outcome {
                    provider,
                    ok: false,
                    usage: None,
                });
                if let Some(cd) = failure.cooldown {
                    pending.cooldowns.push((provider, cd));
                }
                if i == last || !failure.retryable {
                    write_state(store.as_ref(), &pending);
                    return respond_error(out, &failure.error).await;
                }
            }
        }
    }
}

/// One upstream attempt up to the response head; non-2xx answers become a [`Failure`].
async fn attempt(
    c: &Candidate<'_>,
    request: &ChatRequest,
    config: &Config,
) -> Result<IncomingResponse, Failure> {
    let p: &Configured = c.provider;
    let auth = format!("Bearer {}", p.api_key);
    let accept: &[u8] = if request.stream {
        b"text/event-stream"
    } else {
        b"application/json"
    };
    let headers: [(&str, &[u8]); 4] = [
        ("content-type", b"application/json"),
        ("accept", accept),
        ("authorization", auth.as_bytes()),
        ("user-agent", b"freerelay/0.1"),
    ];
    let response = outbound::post(
        &p.chat_url(),
        &headers,
        request.upstream_body(&c.model),
        config.timeouts,
    )
    .await
    .map_err(|t| upstream::judge_transport(p.provider.id, &p.api_key, &t))?;
    let status = response.status();
    if (200..300).contains(&status) {
        return Ok(response);
    }
    let h = response.headers();
    let retry_after = header(&h, "retry-after");
    let reset_requests = header(&h, "x-ratelimit-reset-requests");
    let reset_tokens = header(&h, "x-ratelimit-reset-tokens");
    let body = read_capped(&response, ERROR_BODY_LIMIT).await;
    Err(upstream::judge_status(
        p.provider.id,
        &p.api_key,
        status,
        Hints {
            retry_after: retry_after.as_deref(),
            reset_requests: reset_requests.as_deref(),
            reset_tokens: reset_tokens.as_deref(),
        },
        &body,
        now_ms(),
    ))
}

/// Relays a 2xx upstream answer to the client chunk by chunk, noting usage and stream health.
async fn relay<'a>(
    response: IncomingResponse,
    out: ResponseOutparam,
    c: &Candidate<'a>,
    pending: &mut Pending<'a>,
    store: Option<&kv::SpinKv>,
) -> bool {
    let provider = c.provider.provider.id;
    let content_type =
        header(&response.headers(), "content-type").unwrap_or_else(|| "application/json".into());
    let sse = content_type.contains("text/event-stream");
    let mut extra: Vec<(&str, &str)> = vec![
        ("x-freerelay-provider", provider),
        ("x-freerelay-model", &c.model),
    ];
    if sse {
        extra.push(("cache-control", "no-cache"));
        extra.push(("x-accel-buffering", "no"));
    }
    let client = new_response(200, &content_type, &extra);
    let mut sink = client.take_body();
    out.set(client);

    let mut scanner = SseScanner::default();
    let mut kept = Vec::new();
    let mut failure: Option<String> = None;
    let mut client_gone = false;
    let mut upstream_body = response.take_body_stream();
    while let Some(chunk) = upstream_body.next().await {
        match chunk {
            Ok(bytes) => {
                if sse {
                    scanner.feed(&bytes);
                } else if kept.len() + bytes.len() <= USAGE_BODY_LIMIT {
                    kept.extend_from_slice(&bytes);
                }
                if sink.send(bytes).await.is_err() {
                    client_gone = true;
                    break;
                }
            }
            Err(e) => {
                let timed_out = e.to_debug_string().to_ascii_lowercase().contains("timeout");
                failure = Some(if timed_out {
                    "no data within the between-bytes timeout".into()
                } else {
                    "the upstream connection failed".into()
                });
                break;
            }
        }
    }
    drop(upstream_body);
    let mut ok = !client_gone;
    if sse && !client_gone {
        let why = match failure {
            Some(f) => Some(f),
            None if !scanner.done && !scanner.upstream_error => {
                Some("it ended before [DONE]".into())
            }
            None => None,
        };
        if let Some(why) = why {
            ok = false;
            let _ = sink
                .send(upstream::stream_interrupted(provider, &why).sse_event())
                .await;
        }
        if scanner.upstream_error {
            ok = false;
        }
    } else if failure.is_some() {
        ok = false;
    }
    let usage = if sse {
        scanner.usage
    } else {
        Usage::from_body(&kept)
    };
    pending.outcomes.push(Outcome {
        provider,
        ok,
        usage,
    });
    // The client already has every byte; state is written before the body is closed because
    // Spin aborts the guest once the response body is complete, so later work may never run.
    write_state(store, pending);
    drop(sink);
    ok
}

fn write_state(store: Option<&kv::SpinKv>, pending: &Pending<'_>) {
    let Some(store) = store else { return };
    for (provider, cd) in &pending.cooldowns {
        if let Err(e) = store.set(&keys::cooldown(provider), &cd.encode()) {
            log("kv_write_failed", &[("error", &e.to_string())]);
        }
    }
    for outcome in &pending.outcomes {
        for (key, delta) in outcome.increments() {
            if let Err(e) = store.increment(&key, delta) {
                log("kv_write_failed", &[("error", &e.to_string())]);
            }
        }
    }
}

/// Reads the request body, refusing (413) as soon as it passes `limit` — by its declared length
/// before reading anything, or while reading a chunked body.
async fn read_body(
    req: IncomingRequest,
    headers: &Fields,
    limit: u64,
) -> Result<Vec<u8>, ApiError> {
    if let Some(len) = header(headers, "content-length") {
        match len.trim().parse::<u64>() {
            Ok(n) if n > limit => return Err(ApiError::too_large(limit)),
            Ok(_) => {}
            Err(_) => {
                return Err(ApiError::invalid_request(
                    "Invalid Content-Length header.",
                    None,
                ))
            }
        }
    }
    let mut body = Vec::new();
    let mut stream = req.into_body_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|_| ApiError::invalid_request("The request body could not be read.", None))?;
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(ApiError::too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads at most `limit` bytes of a response body.
async fn read_capped(response: &IncomingResponse, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    let mut stream = response.take_body_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= limit {
            body.truncate(limit);
            break;
        }
    }
    body
}

fn header(fields: &Fields, name: &str) -> Option<String> {
    fields
        .get(name)
        .into_iter()
        .next()
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

fn new_response(status: u16, content_type: &str, extra: &[(&str, &str)]) -> OutgoingResponse {
    let list: Vec<(String, Vec<u8>)> = std::iter::once(("content-type", content_type))
        .chain(extra.iter().copied())
        .map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec()))
        .collect();
    let headers = Fields::from_list(&list).unwrap_or_else(|_| Fields::new());
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    response
}

async fn respond(
    out: ResponseOutparam,
    status: u16,
    content_type: &str,
    body: Vec<u8>,
    extra: &[(&str, &str)],
) {
    let response = new_response(status, content_type, extra);
    if let Err(e) = out.set_with_body(response, body).await {
        log("respond_failed", &[("error", &format!("{e:?}"))]);
    }
}

async fn respond_json(out: ResponseOutparam, body: Vec<u8>) {
    respond(out, 200, "application/json", body, &[]).await
}

async fn respond_error(out: ResponseOutparam, e: &ApiError) {
    let retry = e.retry_after.map(|s| s.to_string());
    let extra: Vec<(&str, &str)> = retry.iter().map(|r| ("retry-after", r.as_str())).collect();
    respond(out, e.status, "application/json", e.body(), &extra).await
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One structured log line on stderr, written with a single call (the host sees one write, not
/// one per JSON token). Never called with a secret.
fn log(event: &str, fields: &[(&str, &str)]) {
    use std::io::Write;
    let mut line = serde_json::Map::new();
    line.insert("event".into(), event.into());
    for (k, v) in fields {
        line.insert((*k).into(), (*v).into());
    }
    let mut bytes = serde_json::to_vec(&serde_json::Value::Object(line)).unwrap_or_default();
    bytes.push(b'\n');
    let _ = std::io::stderr().write_all(&bytes);
}
