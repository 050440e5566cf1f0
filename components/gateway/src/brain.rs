//! The gateway's side of routing: asking the router component (local service chaining) for a
//! decision, planning locally when it cannot answer, and keeping what the decision promised —
//! its audit record, the outcomes it learns from, the conversation's sticky model.

use crate::kv::SpinKv;
use crate::outbound;
use freerelay::adapter::UpstreamRequest;
use freerelay::audit::{self, Outcome};
use freerelay::budget::Tenant;
use freerelay::catalog::ModelInfo;
use freerelay::config::Config;
use freerelay::context::{self, Fit};
use freerelay::error::ApiError;
use freerelay::kv::Kv;
use freerelay::learn;
use freerelay::profile::Family;
use freerelay::route::Candidate;
use freerelay::router::{Decision, Facts, Router, Sticky};
use freerelay::upstream::{Cause, Failure};
use freerelay::wire::openai::ChatRequest;
use futures::StreamExt;
use std::cell::RefCell;

/// Where the router component answers (Spin's local service chaining).
pub const ROUTER_URL: &str = "http://router.spin.internal/route";
/// Largest decision read back from the router.
const DECISION_LIMIT: usize = 4 * 1024 * 1024;

/// How the decision was made.
pub enum Via {
    Component,
    /// The router did not answer in time or failed: why.
    Local(String),
}

/// Asks the router component, within `timeout_ms`; plans locally when it cannot answer. A
/// decision that refuses the request (unknown model, nothing left to route to) is the client's
/// answer either way.
pub async fn decide(
    config: &Config,
    body: &[u8],
    request: &ChatRequest,
    facts: &Facts,
    store: Option<&SpinKv>,
    chained: bool,
    timeout_ms: u64,
) -> (Result<Decision, ApiError>, Via) {
    if chained {
        match outbound::within(timeout_ms, ask(config, body, facts)).await {
            Some(Ok(decided)) => return (decided, Via::Component),
            Some(Err(why)) => return (local(config, request, facts, store), Via::Local(why)),
            None => {
                let why = format!("no answer within router_timeout_ms ({timeout_ms} ms)");
                return (local(config, request, facts, store), Via::Local(why));
            }
        }
    }
    (
        local(config, request, facts, store),
        Via::Local("router = local".into()),
    )
}

/// The same decision, made in this instance.
pub fn local(
    config: &Config,
    request: &ChatRequest,
    facts: &Facts,
    store: Option<&SpinKv>,
) -> Result<Decision, ApiError> {
    let router = Router::new(config, request, facts)?;
    let values = store
        .and_then(|s| s.get_many(router.keys()).ok())
        .unwrap_or_default();
    router.decide(&values)
}

/// One round trip to the router component: `Ok` holds its decision (or the client's error);
/// `Err` says why the router itself failed.
async fn ask(
    config: &Config,
    body: &[u8],
    facts: &Facts,
) -> Result<Result<Decision, ApiError>, String> {
    let facts_json = serde_json::to_string(facts).map_err(|e| e.to_string())?;
    let up = UpstreamRequest {
        url: ROUTER_URL.to_owned(),
        headers: vec![
            ("content-type", "application/json".to_owned()),
            ("x-freerelay-facts", facts_json),
        ],
        body: body.to_vec(),
    };
    let response = outbound::post(up, config.timeouts, || {})
        .await
        .map_err(|e| format!("router unreachable: {e:?}"))?;
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .first()
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let decided = header("x-freerelay-router");
    let retry_after = header("retry-after").and_then(|v| v.trim().parse::<u64>().ok());
    let mut bytes = Vec::new();
    let mut stream = response.take_body_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("router body: {e:?}"))?;
        bytes.extend_from_slice(&chunk);
        if bytes.len() > DECISION_LIMIT {
            return Err("router answer too large".into());
        }
    }
    match (status, decided.as_deref()) {
        (200, Some("plan")) => serde_json::from_slice::<Decision>(&bytes)
            .map(Ok)
            .map_err(|e| format!("router answer unreadable: {e}")),
        (s, Some("error")) if s >= 400 => ApiError::from_body(s, &bytes, retry_after)
            .map(Err)
            .ok_or_else(|| format!("router error unreadable (HTTP {s})")),
        (s, _) => Err(format!(
            "router answered HTTP {s}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )),
    }
}

/// A routed request's audit: written once its outcome is known, before the client sees the
/// end of the answer, so a client that asks for it right after gets it.
pub struct Route {
    pub id: String,
    tenant: Tenant,
    request_id: String,
    model: String,
    created_ms: u64,
    decision: RefCell<Option<Box<serde_json::value::RawValue>>>,
    pub outcome: RefCell<Outcome>,
    entries: u32,
}

impl Route {
    pub fn new(
        id: String,
        tenant: Tenant,
        request_id: &str,
        model: &str,
        now_ms: u64,
        entries: u32,
    ) -> Self {
        Self {
            id,
            tenant,
            request_id: request_id.to_owned(),
            model: model.to_owned(),
            created_ms: now_ms,
            decision: RefCell::new(None),
            outcome: RefCell::new(Outcome::default()),
            entries,
        }
    }

    pub fn set_decision(&self, audit: Box<serde_json::value::RawValue>) {
        *self.decision.borrow_mut() = Some(audit);
    }

    /// Writes the record (status and the rest of the outcome as noted so far).
    pub fn write(
        &self,
        store: Option<&SpinKv>,
        status: u16,
        latency_ms: u64,
    ) -> Result<(), String> {
        let Some(slot) = audit::slot(&self.id, self.entries) else {
            return Ok(());
        };
        let store = match store {
            Some(s) => s,
            None => return Err("no store".into()),
        };
        let mut o = self.outcome.borrow_mut();
        o.status = status;
        o.latency_ms = latency_ms;
        let decision = self.decision.borrow();
        let record = audit::record(
            &self.id,
            &self.tenant,
            &self.request_id,
            &self.model,
            self.created_ms,
            decision.as_ref().map_or("{}", |d| d.get()),
            &o,
        );
        store
            .set(&audit::key(slot), &record)
            .map_err(|e| e.to_string())
    }
}

/// Records an attempt's outcome for the router to learn from (atomic; successes sampled).
pub fn learn(
    store: &SpinKv,
    c: &Candidate,
    family: &str,
    o: learn::Outcome,
    draw: u64,
    now_ms: u64,
) -> Result<(), String> {
    let Some(family) = Family::parse(family) else {
        return Ok(());
    };
    let key = learn::key(&c.provider, &c.model, family);
    learn::record(store, &key, o, draw, now_ms)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Remembers which model served a conversation (written only when it changed).
pub fn stick(
    store: &SpinKv,
    decision: &Decision,
    c: &Candidate,
    tier: freerelay::catalog::Tier,
) -> Result<(), String> {
    let Some(key) = decision.sticky_key.as_deref() else {
        return Ok(());
    };
    let now = Sticky {
        provider: c.provider.clone(),
        model: c.model.clone(),
        tier,
    };
    if decision.sticky.as_ref() == Some(&now) {
        return Ok(());
    }
    store.set(key, &now.encode()).map_err(|e| e.to_string())
}

/// The request as one candidate gets it: cut to its window when it does not fit (the context
/// optimizer), then shaped for it (JSON instructions where it has no JSON mode). `None` when it
/// goes as it is; a failure (`context_length`) when even the messages that must stay do not fit.
pub fn prepare(
    request: &ChatRequest,
    info: &ModelInfo,
) -> Result<(Option<ChatRequest>, Vec<String>), Failure> {
    let reserve = output_reserve(request, info);
    let mut notes = Vec::new();
    let fitted = match context::fit(request, info.context_window, reserve) {
        Fit::Fits => None,
        Fit::Trimmed(t) => {
            notes.push(format!(
                "cut from about {} to {} tokens for a {}-token window: {} messages left out",
                t.before_tokens,
                t.after_tokens,
                info.context_window,
                t.dropped.len()
            ));
            Some(t.request)
        }
        Fit::TooLarge { needed, window } => {
            return Err(Failure {
                error: ApiError::invalid_request(
                    format!(
                        "This conversation needs a context window of about {needed} tokens; this \
                         model has {window}."
                    ),
                    Some("messages"),
                ),
                retryable: true,
                cooldown: None,
                cause: Cause::ContextLength,
            })
        }
    };
    let shaped = context::shape(fitted.as_ref().unwrap_or(request), &info.caps, true);
    notes.extend(shaped.notes);
    Ok((shaped.request.or(fitted), notes))
}

/// Room kept for the answer: what the client asked (a modest default when it did not say),
/// within the model's output limit and at most an eighth of its window — a client asking for
/// the model's whole output limit is the provider's to refuse, not a reason to cut its prompt.
fn output_reserve(request: &ChatRequest, info: &ModelInfo) -> u32 {
    ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|f| request.body().get(*f).and_then(serde_json::Value::as_u64))
        .map_or(1024, |n| n.min(u64::from(u32::MAX)) as u32)
        .min(info.max_output)
        .min(info.context_window / 8)
}

/// The quality signal of a whole JSON answer ([`learn::quality_signal`]).
pub fn quality_of_json(body: &[u8], d: &Decision) -> f64 {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let choice = &v["choices"][0];
    let text = choice["message"]["content"].as_str().unwrap_or("");
    let tools = choice["message"]["tool_calls"]
        .as_array()
        .is_some_and(|a| !a.is_empty());
    learn::quality_signal(
        choice["finish_reason"].as_str(),
        text,
        tools,
        d.json_asked,
        d.tool_forced,
    )
}

/// The quality signal of a complete stream; without its text (not collected), only the finish
/// reason speaks.
pub fn quality_of_stream(finish: Option<&str>, text: Option<&str>, d: &Decision) -> f64 {
    let tools = finish == Some("tool_calls");
    match text {
        Some(t) => learn::quality_signal(finish, t, tools, d.json_asked, d.tool_forced),
        None => learn::quality_signal(finish, "-", true, false, false),
    }
}
