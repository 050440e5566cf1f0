//! FreeRelay's API surface as a Spin HTTP component. A thin shell: it reads variables and state
//! once, asks the `freerelay` core what to do, moves the bytes the core's adapters produce, and
//! performs each key-value operation the moment the core decides it.

mod brain;
mod outbound;
mod respond;

use freerelay::adapter::{self, Adapter, ReplyCtx, StreamEnd, Target};
use freerelay::api::{self, Endpoint};
use freerelay::attempt::{Attempts, Next, Policy};
use freerelay::budget::{self, Tenant};
use freerelay::config::{self, ApiKey, Config, LogEvents};
use freerelay::edge::{self, Snapshot};
use freerelay::error::ApiError;
use freerelay::event::{self, Event};
use freerelay::kv::{apply, Kv, KvOp};
use freerelay::quota::{self, QuotaRef};
use freerelay::route::{self, Candidate};
use freerelay::stats;
use freerelay::upstream::{self, Failure, Hints};
use freerelay::wire::openai::ChatRequest;
use freerelay::wire::openai::Usage;
use freerelay::{aimd, breaker, cache};
use freerelay_spin_kv as kv;
use futures::{SinkExt, StreamExt};
use respond::Reply;
use spin_sdk::http::{Fields, IncomingRequest, IncomingResponse, ResponseOutparam};
use spin_sdk::http_component;
use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Upstream error bodies are read up to this size for their message, then dropped.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// A JSON answer larger than this is refused as broken (real answers are far smaller).
const ANSWER_LIMIT: usize = 16 * 1024 * 1024;

/// Per-request context: the id every event and response carries, the start time, and the
/// events not yet written.
struct Ctx {
    id: String,
    started: Instant,
    /// Events are written in batches — before each upstream request and when the request ends
    /// (on drop) — so a request costs two writes on stderr, not one per event: every write is a
    /// host call, and under Spin a slow one.
    pending: std::cell::RefCell<Vec<u8>>,
    /// Which requests' events are written (`log_events`; `All` until the variables are read).
    level: std::cell::Cell<LogEvents>,
    /// An event so far meant a failure.
    failed: std::cell::Cell<bool>,
    /// The routing decision's audit: its id goes on every response, its record is written
    /// with the outcome before the client sees the end of the answer.
    route: std::cell::RefCell<Option<brain::Route>>,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        self.flush();
    }
}

impl Ctx {
    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Applies `log_events` (an invalid value keeps `all`; the configuration check reports it).
    fn set_level(&self, vars: &HashMap<String, String>) {
        if let Ok(level) = config::log_events(|n| vars.get(n).cloned()) {
            self.level.set(level);
        }
    }

    /// Records one event, stamped now. Never called with a secret.
    fn log(&self, e: &Event) {
        if e.is_failure() {
            self.failed.set(true);
        }
        self.pending
            .borrow_mut()
            .extend_from_slice(&event::line(now_ms(), &self.id, e));
    }

    /// Writes the recorded events in one write — under `failures`, only once the request has
    /// failed (its earlier events then go out with it; a request that never fails leaves none).
    fn flush(&self) {
        use std::io::Write;
        let mut pending = self.pending.borrow_mut();
        let write = match self.level.get() {
            LogEvents::All => true,
            LogEvents::Failures => self.failed.get(),
            LogEvents::Off => {
                pending.clear();
                false
            }
        };
        if write && !pending.is_empty() {
            let _ = std::io::stderr().write_all(&pending);
            pending.clear();
        }
    }

    /// Performs state operations where they are decided; a store failure is logged, never fatal.
    fn apply(&self, store: Option<&kv::SpinKv>, ops: &[KvOp]) {
        let Some(store) = store else { return };
        for op in ops {
            if let Err(e) = apply(store, op) {
                self.log(&Event::StateWriteFailed {
                    key: op.key().to_owned(),
                    error: e.to_string(),
                });
            }
        }
    }

    /// Sends a whole reply and logs the request's last event; a routed request's audit record
    /// is written first.
    async fn reply(&self, out: ResponseOutparam, reply: Reply) {
        let status = reply.status;
        let code = reply.code;
        let mut reply = reply;
        if let Some(id) = self.route_id() {
            reply = reply.with_header("x-freerelay-route-id", id);
            self.write_route(status);
        }
        if let Err(detail) = reply.send(out, &self.id).await {
            self.log(&Event::Internal { detail });
        }
        self.log(&Event::Response {
            status,
            code,
            ms: self.ms(),
        });
    }

    async fn error(&self, out: ResponseOutparam, e: &ApiError) {
        if let Some(r) = self.route.borrow().as_ref() {
            r.outcome.borrow_mut().error = Some(e.message.chars().take(300).collect());
        }
        self.reply(out, Reply::error(e)).await
    }

    fn route_id(&self) -> Option<String> {
        self.route.borrow().as_ref().map(|r| r.id.clone())
    }

    /// Notes something about the routed request's outcome.
    fn note(&self, f: impl FnOnce(&mut freerelay::audit::Outcome)) {
        if let Some(r) = self.route.borrow().as_ref() {
            f(&mut r.outcome.borrow_mut());
        }
    }

    /// Writes the audit record with the outcome so far (best effort, like all state).
    fn write_route(&self, status: u16) {
        let route = self.route.borrow();
        let Some(r) = route.as_ref() else { return };
        let store = kv::SpinKv::open_default().ok();
        if let Err(error) = r.write(store.as_ref(), status, self.ms()) {
            self.log(&Event::StateWriteFailed {
                key: format!("route:v1:{}", r.id),
                error,
            });
        }
    }
}

#[http_component]
async fn handle(req: IncomingRequest, out: ResponseOutparam) {
    let headers = req.headers();
    let ctx = Ctx {
        id: event::request_id(header(&headers, "x-request-id").as_deref(), random_16()),
        started: Instant::now(),
        pending: Default::default(),
        level: std::cell::Cell::new(LogEvents::All),
        failed: Default::default(),
        route: Default::default(),
    };
    let method = req.method().to_string();
    let path = req.path_with_query().unwrap_or_default();
    ctx.log(&Event::RequestStart {
        method: method.clone(),
        path: path
            .split('?')
            .next()
            .unwrap_or("")
            .chars()
            .take(256)
            .collect(),
    });
    let endpoint = match api::endpoint(&method, &path) {
        Ok(e) => e,
        Err(e) => {
            ctx.set_level(&variables());
            return ctx.error(out, &e).await;
        }
    };
    if endpoint == Endpoint::Health {
        return ctx
            .reply(out, Reply::json(200, br#"{"status":"ok"}"#.to_vec()))
            .await;
    }
    let vars = variables();
    ctx.set_level(&vars);
    // Authentication first; no other setting is looked at, or reported, before it passes.
    let digests = match config::client_keys(|n| vars.get(n).cloned()) {
        Ok(d) => d,
        Err(e) => return misconfigured(&ctx, out, e).await,
    };
    let digest =
        match freerelay::auth::check(&digests, header(&headers, "authorization").as_deref()) {
            Ok(d) => d,
            Err(e) => return ctx.error(out, &e).await,
        };
    // Spend is counted per client key, and per end user where OpenWebUI names one.
    let tenant = Tenant::of(
        &digest,
        header(&headers, "x-openwebui-user-id").as_deref(),
        header(&headers, "x-openwebui-user-email").as_deref(),
    );
    let config = match Config::from_vars(|n| vars.get(n).cloned()) {
        Ok(c) => c,
        Err(e) => return misconfigured(&ctx, out, e).await,
    };
    match endpoint {
        Endpoint::Models => {
            ctx.reply(out, Reply::json(200, api::models_body(&config)))
                .await
        }
        Endpoint::Model(id) => match api::model_body(&config, &id) {
            Ok(body) => ctx.reply(out, Reply::json(200, body)).await,
            Err(e) => ctx.error(out, &e).await,
        },
        Endpoint::Stats => {
            let counters = stats::all_keys();
            let n = counters.len();
            let wanted: Vec<String> = counters
                .into_iter()
                .chain(stats::key_state_keys(&config))
                .collect();
            let report = |values: Vec<Option<Vec<u8>>>| {
                let (counters, keys) = values.split_at(n.min(values.len()));
                let mut r = stats::report(counters);
                r["keys"] = stats::keys_report(&config, keys, now_ms());
                r
            };
            state_reply(&ctx, out, &wanted, report).await
        }
        Endpoint::State => {
            let now = now_ms();
            let wanted = edge::state_keys(&config, &tenant, now);
            let report =
                |values: Vec<Option<Vec<u8>>>| edge::state_report(&config, &tenant, &values, now);
            state_reply(&ctx, out, &wanted, report).await
        }
        Endpoint::Route(id) => {
            let entries = match freerelay::router::Settings::from_vars(|n| vars.get(n).cloned()) {
                Ok(s) => s.audit_entries,
                Err(detail) => {
                    return misconfigured(&ctx, out, config::ConfigError { detail }).await
                }
            };
            let found = freerelay::audit::slot(&id, entries).and_then(|slot| {
                let stored = kv::SpinKv::open_default()
                    .and_then(|s| s.get(&freerelay::audit::key(slot)))
                    .ok()
                    .flatten();
                freerelay::audit::read(&id, &tenant, stored.as_deref())
            });
            match found {
                Some(v) => {
                    let body = serde_json::to_vec(&v).unwrap_or_default();
                    ctx.reply(out, Reply::json(200, body)).await
                }
                None => {
                    ctx.error(out, &ApiError::route_not_found(&id, entries))
                        .await
                }
            }
        }
        Endpoint::Policy(verb) => {
            policy_endpoint(&ctx, req, &headers, out, &config, &tenant, verb).await
        }
        Endpoint::ChatCompletions => chat(&ctx, req, &headers, out, &config, &tenant, &vars).await,
        Endpoint::Health => {}
    }
}

/// Reads `keys` in one batch and answers with the JSON `report` makes of them (the stats and
/// state endpoints); a store that cannot be read is a 500.
async fn state_reply(
    ctx: &Ctx,
    out: ResponseOutparam,
    keys: &[String],
    report: impl FnOnce(Vec<Option<Vec<u8>>>) -> serde_json::Value,
) {
    match kv::SpinKv::open_default().and_then(|kv| kv.get_many(keys)) {
        Ok(values) => {
            let body = serde_json::to_vec(&report(values)).unwrap_or_default();
            ctx.reply(out, Reply::json(200, body)).await
        }
        Err(e) => {
            ctx.log(&Event::StateUnavailable {
                error: e.to_string(),
            });
            ctx.error(out, &ApiError::internal("The state store is unavailable."))
                .await
        }
    }
}

async fn misconfigured(ctx: &Ctx, out: ResponseOutparam, e: config::ConfigError) {
    ctx.log(&Event::ConfigError { detail: e.detail });
    ctx.error(out, &ApiError::misconfigured()).await
}

/// Every component variable in one host call (`wasi:config/store.get-all`, which Spin
/// implements), rather than one `variables::get` per setting.
fn variables() -> HashMap<String, String> {
    match spin_sdk::wit::wasi::config::store::get_all() {
        Ok(all) => all.into_iter().collect(),
        Err(_) => config::GLOBAL_VARIABLES
            .iter()
            .map(|n| (*n).to_owned())
            .chain(freerelay::catalog::PROVIDERS.iter().flat_map(|p| {
                config::PROVIDER_VARIABLES
                    .iter()
                    .map(move |s| format!("{}_{s}", p.id))
            }))
            .chain(
                config::CUSTOM_VARIABLES
                    .iter()
                    .map(|s| format!("{}_{s}", freerelay::catalog::CUSTOM)),
            )
            .chain(edge::Settings::variables().map(str::to_owned))
            .chain(freerelay::router::VARIABLES.iter().map(|v| (*v).to_owned()))
            .filter_map(|n| spin_sdk::variables::get(&n).ok().map(|v| (n, v)))
            .collect(),
    }
}

/// A tenant's routing policy: read, replaced (validated first: every error with its line and
/// column) or removed.
async fn policy_endpoint(
    ctx: &Ctx,
    req: IncomingRequest,
    headers: &Fields,
    out: ResponseOutparam,
    config: &Config,
    tenant: &Tenant,
    verb: api::PolicyVerb,
) {
    use freerelay::policy;
    let store = match kv::SpinKv::open_default() {
        Ok(s) => s,
        Err(e) => {
            ctx.log(&Event::StateUnavailable {
                error: e.to_string(),
            });
            return ctx
                .error(out, &ApiError::internal("The state store is unavailable."))
                .await;
        }
    };
    let key = policy::key(&tenant.id);
    let reply = |text: Option<&str>, rules: usize| {
        let body = serde_json::json!({
            "object": "freerelay.policy",
            "tenant": tenant.id,
            "policy": text,
            "rules": rules,
        });
        Reply::json(200, serde_json::to_vec(&body).unwrap_or_default())
    };
    match verb {
        api::PolicyVerb::Get => match store.get(&key) {
            Ok(v) => {
                let text = v.map(|b| String::from_utf8_lossy(&b).into_owned());
                let rules = text
                    .as_deref()
                    .and_then(|t| policy::parse(t).ok())
                    .map_or(0, |p| p.len());
                ctx.reply(out, reply(text.as_deref(), rules)).await
            }
            Err(e) => {
                state_failed(ctx, key, e);
                ctx.error(out, &ApiError::internal("The state store is unavailable."))
                    .await
            }
        },
        api::PolicyVerb::Delete => match store.delete(&key) {
            Ok(()) => ctx.reply(out, reply(None, 0)).await,
            Err(e) => {
                state_failed(ctx, key, e);
                ctx.error(out, &ApiError::internal("The state store is unavailable."))
                    .await
            }
        },
        api::PolicyVerb::Put => {
            let limit = (policy::MAX_POLICY_BYTES as u64).min(config.max_body_bytes);
            let body = match read_body(req, headers, limit).await {
                Ok(b) => b,
                Err(e) => return ctx.error(out, &e).await,
            };
            let Ok(text) = String::from_utf8(body) else {
                let e = ApiError::invalid_request("The policy must be UTF-8 text.", Some("policy"));
                return ctx.error(out, &e).await;
            };
            match policy::parse(&text) {
                Ok(p) => match store.set(&key, text.as_bytes()) {
                    Ok(()) => ctx.reply(out, reply(Some(&text), p.len())).await,
                    Err(e) => {
                        state_failed(ctx, key, e);
                        ctx.error(out, &ApiError::internal("The state store is unavailable."))
                            .await
                    }
                },
                Err(errors) => {
                    let listed: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    let e = ApiError::invalid_request(
                        format!(
                            "The policy has {} error(s): {}",
                            listed.len(),
                            listed.join("; ")
                        ),
                        Some("policy"),
                    );
                    ctx.error(out, &e).await
                }
            }
        }
    }
}

async fn chat(
    ctx: &Ctx,
    req: IncomingRequest,
    headers: &Fields,
    out: ResponseOutparam,
    config: &Config,
    tenant: &Tenant,
    vars: &HashMap<String, String>,
) {
    let body = match read_body(req, headers, config.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return ctx.error(out, &e).await,
    };
    let request = match ChatRequest::parse(&body) {
        Ok(r) => r,
        Err(e) => return ctx.error(out, &e).await,
    };
    let mode = match route::Mode::from_header(header(headers, "x-freerelay-mode").as_deref()) {
        Ok(m) => m,
        Err(e) => return ctx.error(out, &e).await,
    };
    // State is best effort: a store failure must not stop traffic.
    let store = match kv::SpinKv::open_default() {
        Ok(s) => Some(s),
        Err(e) => {
            ctx.log(&Event::StateUnavailable {
                error: e.to_string(),
            });
            None
        }
    };
    // The route: asked of the router component, decided here if it cannot answer.
    let routing = match freerelay::router::Settings::from_vars(|n| vars.get(n).cloned()) {
        Ok(s) => s,
        Err(detail) => return misconfigured(ctx, out, config::ConfigError { detail }).await,
    };
    let facts = freerelay::router::Facts {
        mode: header(headers, "x-freerelay-mode").unwrap_or_default(),
        tenant: tenant.id.clone(),
        user: tenant.user.clone(),
        conversation: header(headers, "x-openwebui-chat-id"),
        rotation: random_u64(),
        now_ms: now_ms(),
    };
    *ctx.route.borrow_mut() = Some(brain::Route::new(
        freerelay::audit::new_id(random_u64()),
        tenant.clone(),
        &ctx.id,
        &request.model,
        facts.now_ms,
        routing.audit_entries,
    ));
    let (decided, via) = brain::decide(
        config,
        &body,
        &request,
        &facts,
        store.as_ref(),
        routing.chained,
        routing.timeout_ms,
    )
    .await;
    if let brain::Via::Local(why) = &via {
        if routing.chained {
            ctx.log(&Event::RouterFallback {
                reason: why.clone(),
            });
            ctx.note(|o| o.router_fallback = Some(why.clone()));
        }
    }
    let decision = match decided {
        Ok(d) => d,
        Err(e) => return ctx.error(out, &e).await,
    };
    ctx.log(&Event::Routed {
        family: decision.family.clone(),
        background: decision.background,
        candidates: decision
            .plan
            .candidates
            .iter()
            .map(|c| format!("{}/{}", c.provider, c.model))
            .collect(),
        via: match via {
            brain::Via::Component => "component",
            brain::Via::Local(_) => "local",
        },
    });
    if let Some(r) = ctx.route.borrow().as_ref() {
        r.set_decision(decision.audit.clone());
    }
    // A tenant's temperature cap applies before anything is sent or cached.
    let request = match decision.max_temperature {
        Some(cap) => {
            let messages = request
                .body()
                .get("messages")
                .and_then(serde_json::Value::as_array)
                .cloned()
                .unwrap_or_default();
            request.with_body(move |b| {
                let t = b.get("temperature").and_then(serde_json::Value::as_f64);
                if t.is_none_or(|t| t > cap) {
                    b.insert("temperature".into(), serde_json::json!(cap));
                }
                messages
            })
        }
        None => request,
    };
    let plan = decision.plan.clone();
    let mode = route::Mode::from_header(Some(&decision.mode)).unwrap_or(mode);
    // The cache: for deterministic requests (and not when the client says
    // `x-freerelay-cache: off`), scoped by tenant and by the model the client chose.
    let cache_policy = config.edge.cache;
    let cacheable = match decision.cache {
        Some(on) => on && cache_policy.mode != cache::Mode::Off,
        None => cache_policy.applies(&request),
    };
    let cache_key = (cacheable
        && header(headers, "x-freerelay-cache")
            .is_none_or(|v| !v.trim().eq_ignore_ascii_case("off")))
    .then(|| {
        cache::Key::of(
            &request,
            cache::Scope::new(tenant.id.clone(), request.model.clone()),
        )
    });
    let extra: Vec<String> = cache_key.iter().map(cache::index_key).collect();
    // Cool-downs, quota counters, breakers, AIMD windows, budgets and the cache's index: one
    // read.
    let now = now_ms();
    // A client's chore runs in the lower priority class: a share of each quota, cool-downs of
    // its own.
    let class = if decision.background {
        quota::Class::Background
    } else {
        quota::Class::Foreground
    };
    let reads = edge::Reads::of(config, &plan, tenant, &extra, class, now);
    let values = match store.as_ref().map(|s| s.get_many(&reads.keys)) {
        Some(Ok(values)) => values,
        Some(Err(e)) => {
            ctx.log(&Event::StateUnavailable {
                error: e.to_string(),
            });
            Vec::new()
        }
        None => Vec::new(),
    };
    let snap = reads.split(config, tenant, values, now);
    // A cached answer costs nothing: served before budgets and breakers are consulted.
    if let (Some(key), Some(s)) = (&cache_key, store.as_ref()) {
        let index = snap.extra.first().cloned().flatten();
        let found = cache::exact_from(index.as_deref(), s, key, now).and_then(|hit| match hit {
            Some(h) => Ok(Some(h)),
            None if cache_policy.mode == cache::Mode::Semantic => {
                cache::lookup_semantic(s, key, &cache_policy, now)
            }
            None => Ok(None),
        });
        match found {
            Ok(Some(hit)) => return serve_cached(ctx, out, s, hit, &request).await,
            Ok(None) => ctx.apply(Some(s), &[cache::Counter::Misses.op()]),
            Err(e) => state_failed(ctx, cache::index_key(key), e),
        }
    }
    let cache_header: Vec<(&'static str, String)> = cache_key
        .iter()
        .map(|_| ("x-freerelay-cache", "miss".to_owned()))
        .collect();
    let mut shaped = Vec::new();
    let shaping = edge::shape(plan, config, &snap, mode, now, &mut shaped);
    shaped.iter().for_each(|e| ctx.log(e));
    let plan = match shaping {
        Ok(p) => p,
        Err(e) => {
            ctx.log(&Event::Refused {
                model: request.model.clone(),
                retry_after_s: e.retry_after,
            });
            ctx.apply(store.as_ref(), &[stats::refused()]);
            return ctx.error(out, &e).await;
        }
    };
    let estimated_tokens = quota::estimate_prompt_tokens(body.len());
    let values = snap.plan_values(&plan, config, class);
    let plan = match plan.usable(config, &values, estimated_tokens, now, class) {
        Ok((p, ops)) => {
            ctx.apply(store.as_ref(), &ops);
            p
        }
        Err(e) => {
            ctx.log(&Event::Refused {
                model: request.model.clone(),
                retry_after_s: e.retry_after,
            });
            ctx.apply(store.as_ref(), &[stats::refused()]);
            return ctx.error(out, &e).await;
        }
    };

    let policy = Policy {
        max_attempts: config.max_attempts,
        short_retry_after_ms: config.short_retry_after_ms,
        ..Policy::default()
    };
    // A broken stream may be continued on the plan's models that accept a prefill, unless the
    // client said `x-freerelay-rescue: off`.
    let rescue_on =
        header(headers, "x-freerelay-rescue").is_none_or(|v| !v.trim().eq_ignore_ascii_case("off"));
    let rescue_candidates: Vec<Candidate> = plan
        .candidates
        .iter()
        .filter(|c| c.prefill)
        .cloned()
        .collect();
    let walk = Walk {
        config,
        store: store.as_ref(),
        snap: &snap,
        tenant,
        request: &request,
        decision: &decision,
        class,
        cache_key: cache_key.as_ref(),
        cache_header: &cache_header,
        rescue_on,
        rescue_candidates: &rescue_candidates,
        prompt_tokens: estimated_tokens,
    };
    let mut attempts = Attempts::with_policy(plan, policy).with_class(class);
    // A policy's `hedge on`: the first attempt sent goes to two candidates at once.
    let mut hedge = decision.hedge;
    // Both hedged attempts failed (both models are avoided for the rest of the request).
    let mut lost_hedge = false;
    loop {
        // `start_ops` (the attempt's counter) are written once the request is on its way.
        let (attempt, candidate, key_id, start_ops) = match attempts.next_step() {
            Next::GiveUp(e) => {
                ctx.note(|o| {
                    o.attempts = attempts.count();
                    o.error = Some(e.message.chars().take(300).collect());
                });
                let reply = Reply::error(&e)
                    .with_header("x-freerelay-attempts", attempts.count().to_string());
                return ctx.reply(out, reply).await;
            }
            Next::Try {
                attempt,
                candidate,
                key,
                delay_ms,
                ops,
                event,
            } => {
                // After a lost hedge, a back-off is for retrying a model now avoided.
                let after_hedge = std::mem::take(&mut lost_hedge);
                if delay_ms > 0 && !after_hedge {
                    // Logged before the wait, so the trail shows why the request paused.
                    ctx.flush();
                    outbound::sleep(delay_ms).await;
                }
                ctx.log(&event);
                (attempt, candidate, key, ops)
            }
        };
        let (launch, held) = match prepare(
            ctx,
            &walk,
            &mut attempts,
            attempt,
            candidate,
            key_id,
            start_ops,
        ) {
            Prepared::Ready(launch, held) => (launch, held),
            Prepared::Skipped => continue,
            Prepared::Broken(e) => return ctx.error(out, &e).await,
        };
        let partner = if std::mem::take(&mut hedge) {
            hedge_partner(ctx, &walk, &mut attempts, &launch)
        } else {
            None
        };
        // What happened so far is on stderr before the upstream is waited for.
        ctx.flush();
        let Some(partner) = partner else {
            let ran = run(ctx, &walk, &launch).await;
            match ran.result {
                Ok(good) => {
                    return deliver(ctx, &walk, out, &attempts, &launch, held, good, ran.ms, 0)
                        .await
                }
                Err((failure, status)) => {
                    let (sent, ms) = (ran.sent, ran.ms);
                    let a = &mut attempts;
                    record_failure(ctx, &walk, a, &launch, held, failure, status, sent, ms);
                    continue;
                }
            }
        };
        match race(ctx, &walk, &mut attempts, (launch, held), partner).await {
            Raced::Won {
                launch,
                held,
                good,
                ms,
                extra,
            } => return deliver(ctx, &walk, out, &attempts, &launch, held, good, ms, extra).await,
            Raced::Lost => lost_hedge = true,
        }
    }
}

/// What every attempt of one chat request shares.
struct Walk<'a> {
    config: &'a Config,
    store: Option<&'a kv::SpinKv>,
    snap: &'a Snapshot,
    tenant: &'a Tenant,
    /// The client's request, the policy's temperature cap applied.
    request: &'a ChatRequest,
    decision: &'a freerelay::router::Decision,
    class: quota::Class,
    /// Set when the answer is to be cached.
    cache_key: Option<&'a cache::Key<'a>>,
    /// Headers every answer adds (`x-freerelay-cache: miss`).
    cache_header: &'a [(&'static str, String)],
    /// `x-freerelay-rescue` is not `off`.
    rescue_on: bool,
    /// The plan's models that accept a prefill (a broken stream may be continued on them).
    rescue_candidates: &'a [Candidate],
    /// The prompt's tokens, estimated from the body's size: what a cancelled attempt is charged.
    prompt_tokens: u64,
}

/// An attempt ready to send: its candidate and key, the request as fitted to its model, and how
/// its answer is translated. What it holds (a breaker probe, an AIMD lease) is kept beside it, in
/// a [`Held`], so that it can be settled while the attempt's future still borrows this.
struct Launch<'a> {
    attempt: u32,
    candidate: Candidate,
    key_id: String,
    configured: &'a config::Configured,
    key: &'a ApiKey,
    /// The request cut or shaped for this model (`None`: the client's, unchanged).
    prepared: Option<ChatRequest>,
    reply: ReplyCtx,
    /// The attempt's counter, written once the request is on its way.
    start_ops: Vec<KvOp>,
    /// The request was handed to the host: the provider may bill it even if it is cancelled.
    launched: std::cell::Cell<bool>,
}

impl Launch<'_> {
    fn target(&self) -> Target<'_> {
        self.configured.target(&self.candidate.model)
    }

    fn name(&self) -> String {
        format!("{}/{}", self.candidate.provider, self.candidate.model)
    }
}

/// What preparing an attempt came to.
enum Prepared<'a> {
    Ready(Box<Launch<'a>>, Held),
    /// It is not sent (recorded in the walk, which goes on).
    Skipped,
    /// The plan names a provider or key the configuration does not have.
    Broken(ApiError),
}

/// Everything before an attempt is sent, in order: its provider and key, the request fitted to
/// its model's window, its key's quota for this minute (reserved right before sending: never
/// more than a key's limit reaches the provider in a window, however many instances race for
/// it), then its breaker's probe and its provider's AIMD admission.
fn prepare<'a>(
    ctx: &Ctx,
    walk: &Walk<'a>,
    attempts: &mut Attempts,
    attempt: u32,
    candidate: Candidate,
    key_id: String,
    start_ops: Vec<KvOp>,
) -> Prepared<'a> {
    let (config, store, request) = (walk.config, walk.store, walk.request);
    let found = config
        .provider(&candidate.provider)
        .and_then(|c| Some((c, c.key(&key_id)?)));
    let Some((configured, key)) = found else {
        // Plans are made from this configuration; a mismatch is a bug, not the client's.
        return Prepared::Broken(ApiError::internal(
            "The routing plan names an unknown provider or key.",
        ));
    };
    // The context optimizer: cut to this model's window, shaped for it.
    let prepared = match brain::prepare(request, &configured.model_info(&candidate.model)) {
        Ok((prepared, notes)) => {
            if !notes.is_empty() {
                ctx.log(&Event::Context {
                    provider: candidate.provider.clone(),
                    model: candidate.model.clone(),
                    notes,
                });
            }
            prepared
        }
        Err(failure) => {
            ctx.note(|o| {
                o.trail.push(format!(
                    "{}/{}: {}",
                    candidate.provider, candidate.model, failure.error.message
                ))
            });
            let decided = attempts.failed(&candidate, &key_id, failure, None, 0);
            ctx.apply(store, &decided.ops);
            decided.events.iter().for_each(|e| ctx.log(e));
            return Prepared::Skipped;
        }
    };
    let reply = ReplyCtx {
        id: format!("chatcmpl-{}", ctx.id.trim_start_matches("fr-")),
        created: now_ms() / 1000,
        model: candidate.model.clone(),
        client_usage: request.include_usage,
        price: configured.price(&candidate.model),
        continuation: false,
        // Kept when a broken stream could be continued with it, or cached.
        collect_text: request.stream
            && ((walk.rescue_on && !walk.rescue_candidates.is_empty()) || walk.cache_key.is_some()),
    };
    let quota = route::quota_ref(config, &candidate, &key_id);
    if let (Some(store), Some(q)) = (store, quota.as_ref()) {
        match quota::admit_minute(store, q, config.share(walk.class), now_ms()) {
            Ok(quota::Verdict::Open) | Ok(quota::Verdict::TooLarge { .. }) => {}
            Ok(
                verdict @ (quota::Verdict::Exhausted { kind, until_ms }
                | quota::Verdict::ShareSpent { kind, until_ms }),
            ) => {
                let secs = until_ms.saturating_sub(now_ms()).div_ceil(1000).max(1);
                let whose = match verdict {
                    quota::Verdict::ShareSpent { .. } => "the background share of this key's",
                    _ => "this key's",
                };
                let failure = Failure {
                    error: ApiError::rate_limited(
                        format!(
                            "Provider `{}`: {whose} {} quota is spent until its window ends.",
                            candidate.provider,
                            kind.as_str()
                        ),
                        Some(secs),
                    ),
                    retryable: true,
                    cooldown: verdict.cooldown(),
                    cause: upstream::Cause::RateLimited,
                };
                let decided = attempts.failed(&candidate, &key_id, failure, None, 0);
                ctx.apply(Some(store), &decided.ops);
                decided.events.iter().for_each(|e| ctx.log(e));
                return Prepared::Skipped;
            }
            Err(e) => ctx.log(&Event::StateWriteFailed {
                key: q.key(quota::Kind::Rpm),
                error: e.to_string(),
            }),
        }
    }
    // The breaker's probe and the provider's AIMD admission, right before sending.
    let held = match store {
        Some(s) => match edge::gate(s, walk.snap, &candidate, attempts.others_left(), now_ms()) {
            Ok(edge::Gate::Go { probe, lease }) => Held { probe, lease },
            Ok(edge::Gate::Pass(passed)) => {
                let (event, why) = *passed;
                ctx.log(&event);
                attempts.pass(why);
                return Prepared::Skipped;
            }
            Err(e) => {
                ctx.log(&Event::StateWriteFailed {
                    key: freerelay::kv::keys::aimd_window(&candidate.provider),
                    error: e.to_string(),
                });
                Held::default()
            }
        },
        None => Held::default(),
    };
    let launch = Launch {
        attempt,
        candidate,
        key_id,
        configured,
        key,
        prepared,
        reply,
        start_ops,
        launched: Default::default(),
    };
    Prepared::Ready(Box::new(launch), held)
}

/// A good answer: a stream whose first event arrived healthy, or a whole JSON answer that
/// parsed.
enum Good {
    Stream(Primed),
    Json(adapter::Answer),
}

/// How an attempt went, `ms` after it was sent; `sent`: it reached the provider.
struct Ran {
    result: Result<Good, Failed>,
    sent: bool,
    ms: u64,
}

/// Sends a prepared attempt and waits for its good answer or its failure. Dropping this future
/// cancels the attempt: wasi:http drops the request with its future-incoming-response, or the
/// connection with its incoming body (every pollable is dropped before its parent resource:
/// see [`outbound::post`] and [`prime`]).
async fn run(ctx: &Ctx, walk: &Walk<'_>, l: &Launch<'_>) -> Ran {
    let config = walk.config;
    let target = l.target();
    let adapter = adapter::for_wire(target.provider.wire);
    let quota = route::quota_ref(config, &l.candidate, &l.key_id);
    // Bookkeeping that need not precede the request runs while it is in flight: the attempt's
    // counter and the quota's per-day count.
    let in_flight = || {
        l.launched.set(true);
        ctx.apply(walk.store, &l.start_ops);
        if let (Some(store), Some(q)) = (walk.store, quota.as_ref()) {
            if let Err(e) = quota::count_in_flight(store, q, now_ms()) {
                ctx.log(&Event::StateWriteFailed {
                    key: q.key(quota::Kind::Rpd),
                    error: e.to_string(),
                });
            }
        }
    };
    let sent = Instant::now();
    let elapsed = || sent.elapsed().as_millis() as u64;
    let log_answered = |status: u16, stream: bool| {
        ctx.log(&Event::AttemptAnswered {
            attempt: l.attempt,
            provider: l.candidate.provider.clone(),
            model: l.candidate.model.clone(),
            upstream_status: status,
            ttfb_ms: elapsed(),
            stream,
        })
    };
    let up = match adapter.request(&target, l.prepared.as_ref().unwrap_or(walk.request)) {
        Ok(up) => up,
        // This wire format cannot carry what the client asked; another candidate may.
        Err(error) => {
            let failure = Failure {
                error,
                retryable: true,
                cooldown: None,
                cause: upstream::Cause::Unsupported,
            };
            return Ran {
                result: Err((failure, None)),
                sent: false,
                ms: elapsed(),
            };
        }
    };
    let result = if walk.request.stream {
        // The first-token deadline covers the head too.
        let head_ms = config
            .timeouts
            .first_byte_ms
            .min(config.first_token_timeout_ms);
        match send(
            adapter,
            &target,
            l.key,
            up,
            config,
            Some(head_ms),
            in_flight,
        )
        .await
        {
            Ok(response) => {
                let status = response.status();
                log_answered(status, true);
                // Nothing is committed to the client until the first event arrives: a silent
                // upstream, or one that fails or errors before its answer, is another attempt.
                // What is left of the first-token deadline after the head:
                let left = config
                    .first_token_timeout_ms
                    .saturating_sub(elapsed())
                    .max(1);
                let translator = adapter.stream(l.reply.clone());
                match prime(response, translator, left, &l.candidate).await {
                    Ok(primed) => Ok(Good::Stream(primed)),
                    Err(failure) => Err((failure, Some(status))),
                }
            }
            Err(failed) => Err(failed),
        }
    } else {
        let deadline = config.timeouts.total_ms;
        let attempt_answer = answer(adapter, &target, l.key, up, config, &l.reply, in_flight);
        match outbound::within(deadline, attempt_answer).await {
            Some(Ok((status, a))) => {
                log_answered(status, false);
                Ok(Good::Json(a))
            }
            Some(Err(failed)) => Err(failed),
            None => Err((
                upstream::broken_answer(
                    target.provider.id,
                    &format!("no complete answer within {deadline} ms"),
                    true,
                ),
                None,
            )),
        }
    };
    Ran {
        result,
        sent: true,
        ms: elapsed(),
    }
}

/// An attempt failed before any byte reached the client: its breaker and AIMD window
/// ([`failed`]), what the router learns, the audit's trail, and where the walk goes next.
#[allow(clippy::too_many_arguments)]
fn record_failure(
    ctx: &Ctx,
    walk: &Walk<'_>,
    attempts: &mut Attempts,
    l: &Launch<'_>,
    held: Held,
    failure: Failure,
    upstream_status: Option<u16>,
    sent: bool,
    ms: u64,
) {
    let (store, c) = (walk.store, &l.candidate);
    failed(
        ctx,
        store,
        walk.config,
        walk.snap,
        attempts,
        c,
        held,
        &failure,
        sent,
    );
    if sent && breaker::is_failure(&failure.cause) {
        learned(ctx, store, walk.decision, c, false, 0.0, ms);
    }
    ctx.note(|o| {
        o.trail.push(format!(
            "{}/{}: {}",
            c.provider, c.model, failure.error.message
        ))
    });
    let mut decided = attempts.failed(c, &l.key_id, failure, upstream_status, ms);
    ctx.apply(store, &decided.ops);
    for e in &mut decided.events {
        // The walk numbers a failure as its latest attempt; a hedge's other one has its own.
        if let Event::AttemptFailed { attempt, .. } = e {
            *attempt = l.attempt;
        }
        ctx.log(e);
    }
}

/// Serves a good answer: a whole JSON answer at once, or the primed stream relayed. `extra`:
/// what a cancelled hedge cost (already recorded), shown in the answer's cost with its own.
#[allow(clippy::too_many_arguments)]
async fn deliver(
    ctx: &Ctx,
    walk: &Walk<'_>,
    out: ResponseOutparam,
    attempts: &Attempts,
    l: &Launch<'_>,
    held: Held,
    good: Good,
    ms: u64,
    extra: u64,
) {
    let (config, store, decision, candidate) =
        (walk.config, walk.store, walk.decision, &l.candidate);
    let answer = match good {
        Good::Json(answer) => answer,
        Good::Stream(primed) => {
            // The lease lasts the stream; its end tells the breaker.
            let probe = held.probe;
            let lease = answered(ctx, store, config, walk.snap, candidate, held, true);
            // Rescue candidates: the models that accept a prefill, this one first.
            let same =
                |c: &&Candidate| c.provider == candidate.provider && c.model == candidate.model;
            let candidates: Vec<Candidate> = walk
                .rescue_candidates
                .iter()
                .filter(same)
                .chain(walk.rescue_candidates.iter().filter(|c| !same(c)))
                .cloned()
                .collect();
            let rescue = Rescue {
                config,
                request: walk.request,
                attempts_left: config.max_attempts.saturating_sub(attempts.count()),
                next_attempt: attempts.count() + 1,
                enabled: walk.rescue_on && !candidates.is_empty(),
                candidates,
                class: walk.class,
            };
            let first = Segment {
                primed,
                candidate: candidate.clone(),
                key: l.key_id.clone(),
                reply: l.reply.clone(),
                lease,
                probe,
            };
            let edge = Edge {
                config,
                snap: walk.snap,
                tenant: walk.tenant,
                cache: walk.cache_key,
                head: walk.cache_header,
                decision,
                extra,
            };
            return relay_stream(ctx, first, out, attempts.count(), store, rescue, edge).await;
        }
    };
    let micro = answer
        .usage
        .and_then(|u| budget::micro_usd(l.reply.price, u.prompt_tokens, u.completion_tokens));
    ctx.log(&Event::Answer {
        provider: candidate.provider.clone(),
        model: candidate.model.clone(),
        finish_reason: answer.finish_reason.clone(),
        prompt_tokens: answer.usage.map(|u| u.prompt_tokens),
        completion_tokens: answer.usage.map(|u| u.completion_tokens),
        cost_usd: micro.map(|m| m as f64 / 1e6),
    });
    let shown = with_extra(micro, extra);
    let usage = answer.usage;
    let cached = walk
        .cache_key
        .and_then(|_| cache::Answer::from_completion(&answer.body, &candidate.provider));
    let quality = brain::quality_of_json(&answer.body, decision);
    ctx.note(|o| {
        o.provider = Some(candidate.provider.clone());
        o.model = Some(candidate.model.clone());
        o.attempts = attempts.count();
        o.cost_usd = shown.map(budget::format_usd);
    });
    let body = add_cost_to_json(answer.body, extra);
    let mut reply = Reply::json(200, body).answered_by(candidate, attempts.count(), shown);
    for (k, v) in walk.cache_header {
        reply = reply.with_header(k, v.clone());
    }
    ctx.reply(out, reply).await;
    // The answer has left: its bookkeeping no longer delays it.
    answered(ctx, store, config, walk.snap, candidate, held, false);
    learned(ctx, store, decision, candidate, true, quality, ms);
    stick(ctx, store, config, decision, candidate);
    if let (Some(key), Some(a)) = (walk.cache_key, cached) {
        cache_store(ctx, store, key, &a, &config.edge.cache);
    }
    // Counted right after the answer left: the component runs on after its response is
    // finished (under Spin as under the runner), so the client does not wait for these writes
    // and leaving cannot cancel them.
    if let Some(u) = usage {
        ctx.apply(store, &Attempts::usage(candidate, u));
        let quota = route::quota_ref(config, candidate, &l.key_id);
        count_tokens(ctx, store, quota.as_ref(), u);
    }
    record_spend(ctx, store, config, walk.snap, walk.tenant, micro);
}

/// The hedge's second attempt, alongside `first`: the next candidate in the plan (another
/// provider-model: `first`'s model is avoided for the rest of the request, raced rather than
/// retried), prepared like any attempt. `None` when there is none or the attempt budget has no
/// room (the walk is then as it was), or when it cannot be sent now (its skip is recorded like
/// any).
fn hedge_partner<'a>(
    ctx: &Ctx,
    walk: &Walk<'a>,
    attempts: &mut Attempts,
    first: &Launch<'_>,
) -> Option<(Box<Launch<'a>>, Held)> {
    let before = attempts.clone();
    attempts.avoid(&first.candidate.provider, &first.candidate.model);
    let step = attempts.others_left().then(|| attempts.next_step());
    let Some(Next::Try {
        attempt,
        candidate,
        key,
        ops,
        event,
        ..
    }) = step
    else {
        *attempts = before;
        return None;
    };
    ctx.log(&event);
    match prepare(ctx, walk, attempts, attempt, candidate, key, ops) {
        Prepared::Ready(launch, held) => Some((launch, held)),
        Prepared::Skipped => None,
        Prepared::Broken(_) => {
            *attempts = before;
            None
        }
    }
}

/// How a hedged attempt ended.
enum Raced<'a> {
    /// One answered well; `extra` is what the other cost (recorded already) when it was
    /// cancelled rather than failed.
    Won {
        launch: Box<Launch<'a>>,
        held: Held,
        good: Good,
        ms: u64,
        extra: u64,
    },
    /// Both failed: each failure is recorded, and both models are avoided from now on.
    Lost,
}

/// Sends two attempts at once and keeps the first good answer ([`Good`]: for a stream, the first
/// whose first event arrived healthy; for JSON, the first whole answer that parsed). The other is
/// cancelled by dropping its future. When the first to finish failed, the other is waited for.
async fn race<'a>(
    ctx: &Ctx,
    walk: &Walk<'a>,
    attempts: &mut Attempts,
    a: (Box<Launch<'a>>, Held),
    b: (Box<Launch<'a>>, Held),
) -> Raced<'a> {
    use futures::future::{select, Either};
    use futures::FutureExt;
    ctx.note(|o| o.hedged = true);
    let launches = [a.0, b.0];
    let mut held = [Some(a.1), Some(b.1)];
    type Run<'r> = std::pin::Pin<Box<dyn std::future::Future<Output = Ran> + 'r>>;
    let run_a: Run = Box::pin(run(ctx, walk, &launches[0]));
    let run_b: Run = Box::pin(run(ctx, walk, &launches[1]));
    let (first, ran, other) = match select(run_a, run_b).await {
        Either::Left((ran, other)) => (0, ran, other),
        Either::Right((ran, other)) => (1, ran, other),
    };
    // `late`: `None` when the other failed first, else what one last poll of it found before
    // it is dropped (an answer complete by then is kept for its usage: what its provider bills).
    let (winner, good, ms, late) = match ran.result {
        Ok(good) => (first, good, ran.ms, Some(other.now_or_never())),
        Err(failed) => {
            let l = &launches[first];
            let h = held[first].take().unwrap_or_default();
            hedge_failed(ctx, walk, attempts, l, h, failed, ran.sent, ran.ms);
            let ran = other.await;
            match ran.result {
                Ok(good) => (1 - first, good, ran.ms, None),
                Err(failed) => {
                    let l = &launches[1 - first];
                    let h = held[1 - first].take().unwrap_or_default();
                    hedge_failed(ctx, walk, attempts, l, h, failed, ran.sent, ran.ms);
                    return Raced::Lost;
                }
            }
        }
    };
    let loser = 1 - winner;
    let (l, h) = (&launches[loser], held[loser].take().unwrap_or_default());
    let extra = match late {
        None => 0,
        Some(Some(Ran {
            result: Err(failed),
            sent,
            ms,
        })) => {
            hedge_failed(ctx, walk, attempts, l, h, failed, sent, ms);
            0
        }
        Some(late) => {
            let late = late.and_then(|r| r.result.ok());
            cancelled(ctx, walk, l, h, late, &launches[winner].name())
        }
    };
    ctx.log(&Event::Hedged {
        winner: launches[winner].name(),
        loser: launches[loser].name(),
    });
    let [a, b] = launches;
    Raced::Won {
        launch: if winner == 0 { a } else { b },
        held: held[winner].take().unwrap_or_default(),
        good,
        ms,
        extra,
    }
}

/// A hedged attempt failed: recorded like any failure, and its model avoided from now on (both
/// hedged models had their turn).
#[allow(clippy::too_many_arguments)]
fn hedge_failed(
    ctx: &Ctx,
    walk: &Walk<'_>,
    attempts: &mut Attempts,
    l: &Launch<'_>,
    held: Held,
    (failure, status): Failed,
    sent: bool,
    ms: u64,
) {
    attempts.avoid(&l.candidate.provider, &l.candidate.model);
    record_failure(ctx, walk, attempts, l, held, failure, status, sent, ms);
}

/// Settles a hedged attempt cancelled because `winner` answered first (`late`: its own good
/// answer, when the last poll found one). Being cancelled is no congestion and no failure of its
/// provider: its AIMD lease is released, its breaker and the router are told nothing. What it
/// cost is recorded and returned: its usage when its JSON answer was complete, else its prompt
/// at the estimate (the provider bills the prompt it read) once the request had left.
fn cancelled(
    ctx: &Ctx,
    walk: &Walk<'_>,
    l: &Launch<'_>,
    held: Held,
    late: Option<Good>,
    winner: &str,
) -> u64 {
    let (store, c) = (walk.store, &l.candidate);
    end_lease(ctx, store, walk.config, held.lease, false, false);
    let usage = match late {
        Some(Good::Json(answer)) => answer.usage,
        _ => None,
    };
    let micro = match usage {
        Some(u) => {
            ctx.apply(store, &Attempts::usage(c, u));
            let quota = route::quota_ref(walk.config, c, &l.key_id);
            count_tokens(ctx, store, quota.as_ref(), u);
            budget::micro_usd(l.reply.price, u.prompt_tokens, u.completion_tokens)
        }
        None if l.launched.get() => budget::micro_usd(l.reply.price, walk.prompt_tokens, 0),
        None => None,
    }
    .unwrap_or(0);
    ctx.note(|o| {
        o.trail.push(format!(
            "{}/{}: cancelled, {winner} answered first",
            c.provider, c.model
        ))
    });
    record_spend(ctx, store, walk.config, walk.snap, walk.tenant, Some(micro));
    micro
}

/// An answer's cost with a cancelled hedge's added (`None` when neither is known).
fn with_extra(micro: Option<u64>, extra: u64) -> Option<u64> {
    match (micro, extra) {
        (m, 0) => m,
        (m, e) => Some(m.unwrap_or(0).saturating_add(e)),
    }
}

/// Adds `extra` micro-dollars to the `usage.cost` (USD) of `v`, if it has one.
fn add_cost(v: &mut serde_json::Value, extra: u64) -> bool {
    let Some(cost) = v.pointer_mut("/usage/cost") else {
        return false;
    };
    let Some(usd) = cost.as_f64() else {
        return false;
    };
    let micro = ((usd * 1e6).round() as u64).saturating_add(extra);
    *cost = serde_json::json!(micro as f64 / 1e6);
    true
}

/// A JSON answer's body with `extra` added to its `usage.cost` (unchanged when it has none).
fn add_cost_to_json(body: Vec<u8>, extra: u64) -> Vec<u8> {
    if extra == 0 {
        return body;
    }
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return body;
    };
    if !add_cost(&mut v, extra) {
        return body;
    }
    serde_json::to_vec(&v).unwrap_or(body)
}

/// Adds `*extra` to the `usage.cost` of the usage chunk among `events` (client SSE bytes), once:
/// `*extra` is zero once it is shown.
fn add_cost_to_events(events: &mut Vec<u8>, extra: &mut u64) {
    if *extra == 0 || !events.windows(6).any(|w| w == b"\"cost\"") {
        return;
    }
    let Ok(text) = std::str::from_utf8(events) else {
        return;
    };
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        let parsed = body
            .strip_prefix("data: ")
            .filter(|_| *extra > 0)
            .and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok());
        match parsed {
            Some(mut v)
                if v.pointer("/usage/cost")
                    .is_some_and(serde_json::Value::is_number) =>
            {
                add_cost(&mut v, *extra);
                *extra = 0;
                out.push_str("data: ");
                out.push_str(&v.to_string());
                out.push_str(&line[body.len()..]);
            }
            _ => out.push_str(line),
        }
    }
    *events = out.into_bytes();
}

/// A failed attempt: the judgement, and the upstream's status when it answered.
type Failed = (Failure, Option<u16>);

/// One upstream request up to its 2xx head; non-2xx answers become a [`Failure`].
#[allow(clippy::too_many_arguments)]
async fn send(
    adapter: &dyn Adapter,
    target: &Target<'_>,
    key: &ApiKey,
    mut up: adapter::UpstreamRequest,
    config: &Config,
    first_byte_ms: Option<u64>,
    in_flight: impl FnOnce(),
) -> Result<IncomingResponse, Failed> {
    let provider = target.provider.id;
    adapter::authorize(&mut up, target.provider.auth, key.secret());
    let mut timeouts = config.timeouts;
    if let Some(ms) = first_byte_ms {
        timeouts.first_byte_ms = ms;
    }
    let response = outbound::post(up, timeouts, in_flight)
        .await
        .map_err(|t| (upstream::judge_transport(provider, key.secret(), &t), None))?;
    let status = response.status();
    if (200..300).contains(&status) {
        return Ok(response);
    }
    let h = response.headers();
    let retry_after = header(&h, "retry-after");
    // OpenAI and Groq send reset durations; Anthropic sends RFC 3339 reset times.
    let reset_requests = header(&h, "x-ratelimit-reset-requests")
        .or_else(|| header(&h, "anthropic-ratelimit-requests-reset"));
    let reset_tokens = header(&h, "x-ratelimit-reset-tokens")
        .or_else(|| header(&h, "anthropic-ratelimit-tokens-reset"));
    let body = read_capped(&response, ERROR_BODY_LIMIT).await;
    let hints = Hints {
        retry_after: retry_after.as_deref(),
        reset_requests: reset_requests.as_deref(),
        reset_tokens: reset_tokens.as_deref(),
    };
    Err((
        adapter.judge(provider, key.secret(), status, hints, &body, now_ms()),
        Some(status),
    ))
}

/// A non-streaming attempt: the whole answer is read and checked before anything is sent to
/// the client, so an upstream that fails after its 200 is a failure (and, under a virtual
/// model, a fallback), never a truncated 200.
async fn answer(
    adapter: &dyn Adapter,
    target: &Target<'_>,
    key: &ApiKey,
    up: adapter::UpstreamRequest,
    config: &Config,
    reply: &ReplyCtx,
    in_flight: impl FnOnce(),
) -> Result<(u16, adapter::Answer), Failed> {
    let provider = target.provider.id;
    // The head of a JSON answer comes when the answer is ready: only the total deadline
    // (enforced around this whole attempt) bounds it.
    let first_byte = Some(config.timeouts.total_ms);
    let response = send(adapter, target, key, up, config, first_byte, in_flight).await?;
    let status = response.status();
    let mut body = Vec::new();
    let mut stream = response.take_body_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) if body.len() + bytes.len() > ANSWER_LIMIT => {
                let why = format!("its answer exceeds {ANSWER_LIMIT} bytes");
                return Err((upstream::broken_answer(provider, &why, false), Some(status)));
            }
            Ok(bytes) => body.extend_from_slice(&bytes),
            Err(e) => {
                let timed_out = is_timeout(&e);
                let why = if timed_out {
                    "it went silent in the middle of its answer"
                } else {
                    "the connection broke in the middle of its answer"
                };
                return Err((
                    upstream::broken_answer(provider, why, timed_out),
                    Some(status),
                ));
            }
        }
    }
    match adapter.answer(&body, reply) {
        Ok(a) => Ok((status, a)),
        Err(why) => Err((upstream::broken_answer(provider, &why, false), Some(status))),
    }
}

/// A stream whose first event has arrived (nothing sent to the client yet). Fields drop in
/// order: the body stream before the response it belongs to.
struct Primed {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = Result<Vec<u8>, wasi::io::streams::Error>>>>,
    translator: Box<dyn adapter::StreamTranslator>,
    /// Client bytes the first events produced.
    pending: Vec<u8>,
    _response: IncomingResponse,
}

/// Reads a stream until its first token (text, reasoning or a tool call; or its end), within
/// `timeout_ms`: before that the 200 is not committed, so a silent upstream (no first token),
/// one that breaks, or one whose first words are an error event is a failed attempt, and the
/// next candidate can still answer.
async fn prime(
    response: IncomingResponse,
    mut translator: Box<dyn adapter::StreamTranslator>,
    timeout_ms: u64,
    candidate: &Candidate,
) -> Result<Primed, Failure> {
    let provider = candidate.provider.as_str();
    let mut body = Box::pin(response.take_body_stream());
    let mut pending = Vec::new();
    let first = outbound::within(timeout_ms, async {
        while let Some(chunk) = body.next().await {
            let bytes = chunk.map_err(|e| {
                if is_timeout(&e) {
                    "it went silent before its first event".to_owned()
                } else {
                    "the connection broke before its first event".to_owned()
                }
            })?;
            translator.feed(&bytes, &mut pending);
            let s = translator.state();
            if s.upstream_error {
                return Err(error_event_message(&pending).map_or_else(
                    || "it sent an error event before its answer".to_owned(),
                    |m| format!("it sent an error before its answer: {m}"),
                ));
            }
            // A role chunk or a keep-alive is not yet a first token.
            if s.content || s.done || s.broken.is_some() {
                return Ok(());
            }
        }
        Err("it ended before its first event".to_owned())
    })
    .await;
    match first {
        Some(Ok(())) => Ok(Primed {
            body,
            translator,
            pending,
            _response: response,
        }),
        Some(Err(why)) => Err(upstream::broken_answer(provider, &why, false)),
        None => Err(upstream::broken_answer(
            provider,
            &format!("no first event within {timeout_ms} ms (first_token_timeout_ms)"),
            true,
        )),
    }
}

/// The message of the OpenAI error event among translated client bytes, if any.
fn error_event_message(bytes: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(bytes).ok()?;
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .find(|d| d.starts_with("{\"error\""))
        .and_then(|d| freerelay::wire::openai::error_message(d.as_bytes()))
}

/// One stretch of a streamed answer: a primed upstream stream and who sends it.
struct Segment {
    primed: Primed,
    candidate: Candidate,
    key: String,
    reply: ReplyCtx,
    /// The attempt's AIMD lease, ended with the stream.
    lease: Option<aimd::Admitted>,
    /// The attempt was its breaker's probe (already settled).
    probe: bool,
}

/// What rescuing a broken stream may use: the request, the candidates whose models accept a
/// prefill (the broken one first), and the attempts left in the request's budget.
struct Rescue<'a> {
    config: &'a Config,
    request: &'a ChatRequest,
    candidates: Vec<Candidate>,
    attempts_left: u32,
    /// Number of the next attempt, for the log.
    next_attempt: u32,
    /// Off with `x-freerelay-rescue: off`, or when no candidate accepts a prefill.
    enabled: bool,
    /// The request's priority class.
    class: quota::Class,
}

/// Relays a 2xx stream: whole events only, usage recorded the moment it is known, and the body
/// finished as soon as the answer is complete. A stream that breaks after bytes reached the
/// client is rescued when it can be: the answer so far becomes an assistant prefill for another
/// attempt (the same model first, only on models that accept a prefill), whose stream continues
/// the same response, so the client gets one complete answer; otherwise a clean error event,
/// never a truncated success.
async fn relay_stream(
    ctx: &Ctx,
    first: Segment,
    out: ResponseOutparam,
    attempts: u32,
    store: Option<&kv::SpinKv>,
    mut rescue: Rescue<'_>,
    edge: Edge<'_>,
) {
    let head: Vec<(&'static str, String)> = edge
        .head
        .iter()
        .cloned()
        .chain(ctx.route_id().map(|id| ("x-freerelay-route-id", id)))
        .collect();
    let client = match respond::stream_head(&ctx.id, &first.candidate, attempts, &head) {
        Ok(r) => r,
        Err(detail) => {
            ctx.log(&Event::Internal { detail });
            return ctx
                .error(out, &ApiError::internal("The response could not be built."))
                .await;
        }
    };
    let mut sink = client.take_body();
    out.set(client);
    ctx.flush();

    let mut segment = first;
    // The answer's text before the current segment (rescues continue from it).
    let mut answered = String::new();
    // A cancelled hedge's cost, until the answer's usage chunk shows it.
    let mut extra = edge.extra;
    loop {
        let Segment {
            primed,
            candidate,
            key,
            reply,
            mut lease,
            probe,
        } = segment;
        let quota = route::quota_ref(rescue.config, &candidate, &key);
        let quota = quota.as_ref();
        let provider = candidate.provider.as_str();
        let Primed {
            body: mut upstream_body,
            mut translator,
            mut pending,
            _response,
        } = primed;
        let mut failure: Option<&str> = None;
        let mut client_gone = false;
        if let Some(u) = translator.take_new_usage() {
            ctx.apply(store, &Attempts::usage(&candidate, u));
            count_tokens(ctx, store, quota, u);
        }
        let finished = translator.state().done || translator.state().broken.is_some();
        add_cost_to_events(&mut pending, &mut extra);
        if !pending.is_empty() && sink.send(std::mem::take(&mut pending)).await.is_err() {
            client_gone = true;
        }
        while !client_gone && !finished {
            let Some(chunk) = upstream_body.next().await else {
                break;
            };
            let bytes = match chunk {
                Ok(b) => b,
                Err(e) => {
                    failure = Some(if is_timeout(&e) {
                        "no data within the between-bytes timeout"
                    } else {
                        "the upstream connection failed"
                    });
                    break;
                }
            };
            translator.feed(&bytes, &mut pending);
            if let Some(u) = translator.take_new_usage() {
                ctx.apply(store, &Attempts::usage(&candidate, u));
                count_tokens(ctx, store, quota, u);
            }
            // A long stream keeps its AIMD lease (a write only once per lease period).
            if let (Some(s), Some(l)) = (store, lease.as_mut()) {
                let _ = aimd::renew(s, &mut l.lease, now_ms(), &edge.config.edge.aimd);
            }
            let done = translator.state().done || translator.state().broken.is_some();
            add_cost_to_events(&mut pending, &mut extra);
            if !pending.is_empty() && sink.send(std::mem::take(&mut pending)).await.is_err() {
                client_gone = true;
                break;
            }
            if done {
                break;
            }
        }
        drop(upstream_body);
        drop(_response);
        let end = if client_gone {
            None
        } else {
            let end = translator.end(failure, &mut pending);
            // The audit is written before the answer's last bytes leave.
            let st = translator.state();
            let micro_now = st
                .usage
                .and_then(|u| budget::micro_usd(reply.price, u.prompt_tokens, u.completion_tokens));
            ctx.note(|o| {
                o.provider = Some(candidate.provider.clone());
                o.model = Some(candidate.model.clone());
                o.attempts = attempts.max(rescue.next_attempt.saturating_sub(1));
                o.cost_usd = with_extra(micro_now, edge.extra).map(budget::format_usd);
                o.error = match &end {
                    StreamEnd::Complete => None,
                    StreamEnd::UpstreamError => Some("the upstream sent an error event".into()),
                    StreamEnd::Interrupted(why) => Some(why.clone()),
                };
            });
            ctx.write_route(200);
            add_cost_to_events(&mut pending, &mut extra);
            if !pending.is_empty() && sink.send(std::mem::take(&mut pending)).await.is_err() {
                client_gone = true;
            }
            if let Some(u) = translator.take_new_usage() {
                ctx.apply(store, &Attempts::usage(&candidate, u));
                count_tokens(ctx, store, quota, u);
            }
            (!client_gone).then_some(end)
        };
        let state = translator.state();
        let usage = state.usage;
        let (ok, why) = match &end {
            None => (false, Some("the client went away".to_owned())),
            Some(StreamEnd::Complete) => (true, None),
            Some(StreamEnd::UpstreamError) => {
                (false, Some("the upstream sent an error event".into()))
            }
            Some(StreamEnd::Interrupted(why)) => (false, Some(why.clone())),
        };
        let ops = match &end {
            None => Attempts::client_gone(&candidate),
            Some(StreamEnd::Complete) => Vec::new(),
            Some(_) => Attempts::broke_after_commit(&candidate),
        };
        ctx.apply(store, &ops);
        let complete = matches!(end, Some(StreamEnd::Complete));
        end_lease(ctx, store, edge.config, lease.take(), complete, false);
        let ttfb = ctx.ms();
        match &end {
            Some(StreamEnd::Complete) => {
                let q = brain::quality_of_stream(
                    state.finish_reason.as_deref(),
                    state.text.as_deref(),
                    edge.decision,
                );
                learned(ctx, store, edge.decision, &candidate, true, q, ttfb);
                stick(ctx, store, edge.config, edge.decision, &candidate);
            }
            Some(StreamEnd::Interrupted(_)) => {
                learned(ctx, store, edge.decision, &candidate, false, 0.0, ttfb);
            }
            _ => {}
        }
        // How the stream ended tells its breaker (a probe's success was recorded at its first
        // token; a client gone says nothing of the provider).
        let verdict = match &end {
            Some(StreamEnd::Interrupted(_)) => Some(true),
            Some(StreamEnd::Complete) if !probe => Some(false),
            _ => None,
        };
        if let (Some(failed), Some(s)) = (verdict, store) {
            match edge::breaker_outcome(s, edge.snap, &candidate, failed, false, now_ms()) {
                Ok(e) => e.iter().for_each(|e| ctx.log(e)),
                Err(e) => state_failed(
                    ctx,
                    freerelay::kv::keys::breaker_state(&candidate.provider, &candidate.model),
                    e,
                ),
            }
        }
        let micro = usage
            .and_then(|u| budget::micro_usd(reply.price, u.prompt_tokens, u.completion_tokens));
        record_spend(ctx, store, edge.config, edge.snap, edge.tenant, micro);
        if client_gone {
            ctx.log(&Event::ClientGone {
                provider: provider.to_owned(),
                ms: ctx.ms(),
            });
        }
        ctx.log(&Event::StreamEnd {
            provider: provider.to_owned(),
            model: candidate.model.clone(),
            ok,
            why,
            finish_reason: state.finish_reason.clone(),
            cost_usd: micro.map(|m| m as f64 / 1e6),
            events: state.events,
            prompt_tokens: usage.map(|u| u.prompt_tokens),
            completion_tokens: usage.map(|u| u.completion_tokens),
            ms: ctx.ms(),
        });
        // A complete answer, from its first segment to this one, is cached.
        if let (true, Some(key), Some(text)) = (complete, edge.cache, state.text.as_deref()) {
            let finish = state.finish_reason.as_deref().unwrap_or("stop");
            let a = cache::Answer::text(
                &candidate.provider,
                &reply.model,
                &format!("{answered}{text}"),
                finish,
                usage.unwrap_or_default(),
                reply.created,
            );
            cache_store(ctx, store, key, &a, &edge.config.edge.cache);
        }
        if let Some(StreamEnd::Interrupted(why)) = &end {
            let text = state.text.clone();
            if let (true, Some(text)) = (rescue.enabled, text) {
                answered.push_str(&text);
                if let Some(next) = rescue_stream(ctx, &mut rescue, &answered, &reply, store).await
                {
                    segment = next;
                    continue;
                }
            }
            // Only whole events were relayed, so this error event starts at an event boundary
            // and parses; no [DONE] follows, so SDKs raise instead of returning a truncated
            // answer.
            let _ = sink
                .send(upstream::stream_interrupted(provider, why).sse_event())
                .await;
        }
        // The answer is complete (or ended): finish the body now, in this poll, so the last
        // bytes and the end of the body leave together.
        drop(sink);
        return;
    }
}

/// Finds a stream that continues `answered` (an assistant prefill): the rescue candidates in
/// order, each key once, within the attempts left. `None` when none can.
async fn rescue_stream(
    ctx: &Ctx,
    rescue: &mut Rescue<'_>,
    answered: &str,
    broken: &ReplyCtx,
    store: Option<&kv::SpinKv>,
) -> Option<Segment> {
    let config = rescue.config;
    let request = rescue.request.with_prefill(answered);
    for candidate in rescue.candidates.clone() {
        for key_id in &candidate.keys {
            if rescue.attempts_left == 0 {
                return None;
            }
            let Some((configured, key)) = config
                .provider(&candidate.provider)
                .and_then(|c| Some((c, c.key(key_id)?)))
            else {
                continue;
            };
            rescue.attempts_left -= 1;
            let attempt = rescue.next_attempt;
            rescue.next_attempt += 1;
            ctx.log(&Event::AttemptStart {
                attempt,
                provider: candidate.provider.clone(),
                model: candidate.model.clone(),
                key: key_id.clone(),
            });
            let quota = route::quota_ref(config, &candidate, key_id);
            if let (Some(store), Some(q)) = (store, quota.as_ref()) {
                let share = config.share(rescue.class);
                if let Ok(quota::Verdict::Exhausted { .. } | quota::Verdict::ShareSpent { .. }) =
                    quota::admit_minute(store, q, share, now_ms())
                {
                    continue;
                }
            }
            let target = configured.target(&candidate.model);
            let adapter = adapter::for_wire(target.provider.wire);
            let reply = ReplyCtx {
                model: candidate.model.clone(),
                price: configured.price(&candidate.model),
                continuation: true,
                collect_text: true,
                ..broken.clone()
            };
            let Ok(up) = adapter.request(&target, &request) else {
                continue;
            };
            ctx.flush();
            let sent = Instant::now();
            let head_ms = config
                .timeouts
                .first_byte_ms
                .min(config.first_token_timeout_ms);
            let in_flight = || {
                ctx.apply(store, &[stats::attempt_started(&candidate.provider)]);
                if let (Some(store), Some(q)) = (store, quota.as_ref()) {
                    let _ = quota::count_in_flight(store, q, now_ms());
                }
            };
            let sent_to = send(adapter, &target, key, up, config, Some(head_ms), in_flight);
            let failed = match sent_to.await {
                Ok(response) => {
                    let status = response.status();
                    let left = config
                        .first_token_timeout_ms
                        .saturating_sub(sent.elapsed().as_millis() as u64)
                        .max(1);
                    match prime(response, adapter.stream(reply.clone()), left, &candidate).await {
                        Ok(primed) => {
                            ctx.log(&Event::AttemptAnswered {
                                attempt,
                                provider: candidate.provider.clone(),
                                model: candidate.model.clone(),
                                upstream_status: status,
                                ttfb_ms: sent.elapsed().as_millis() as u64,
                                stream: true,
                            });
                            return Some(Segment {
                                primed,
                                candidate: candidate.clone(),
                                key: key_id.clone(),
                                reply,
                                lease: None,
                                probe: false,
                            });
                        }
                        Err(f) => (f, Some(status)),
                    }
                }
                Err(failed) => failed,
            };
            let (failure, upstream_status) = failed;
            let mut ops = vec![stats::attempt_failed(&candidate.provider)];
            ops.extend(Attempts::cooldown_op(
                &candidate,
                key_id,
                &failure,
                rescue.class,
            ));
            ctx.apply(store, &ops);
            ctx.log(&Event::AttemptFailed {
                attempt,
                provider: candidate.provider.clone(),
                model: candidate.model.clone(),
                upstream_status,
                status: failure.error.status,
                reason: failure.error.message.clone(),
                retryable: failure.retryable,
                cooldown_until_ms: failure.cooldown.map(|c| c.until_ms),
                ms: sent.elapsed().as_millis() as u64,
            });
        }
    }
    None
}

/// What an attempt holds until it ends: its breaker's probe and its provider's AIMD lease.
#[derive(Default)]
struct Held {
    probe: bool,
    lease: Option<aimd::Admitted>,
}

/// The edge state a stream's relay settles at its end.
struct Edge<'a> {
    config: &'a Config,
    snap: &'a Snapshot,
    tenant: &'a Tenant,
    /// Set when the answer is to be cached.
    cache: Option<&'a cache::Key<'a>>,
    /// Headers the stream's head adds (`x-freerelay-cache: miss`).
    head: &'a [(&'static str, String)],
    /// The routing decision (what to learn, the conversation to keep on its model).
    decision: &'a freerelay::router::Decision,
    /// What a cancelled hedge cost (recorded already): shown in the answer's cost with its own.
    extra: u64,
}

/// Answers from the cache: the stored answer as JSON or replayed as SSE, at no cost.
async fn serve_cached(
    ctx: &Ctx,
    out: ResponseOutparam,
    store: &kv::SpinKv,
    hit: cache::Hit,
    request: &ChatRequest,
) {
    let id = format!("chatcmpl-{}", ctx.id.trim_start_matches("fr-"));
    let created = now_ms() / 1000;
    let kind = match hit.kind {
        cache::HitKind::Exact => "exact",
        cache::HitKind::Semantic => "semantic",
    };
    ctx.log(&Event::Cache {
        outcome: kind,
        similarity: Some(hit.similarity),
        detail: None,
    });
    let a = &hit.entry.answer;
    let reply = if request.stream {
        Reply::sse(cache::render_sse(
            &hit.entry,
            &id,
            created,
            request.include_usage,
        ))
    } else {
        Reply::json(200, cache::render_json(&hit.entry, &id, created))
    };
    let reply = reply
        .with_header("x-freerelay-cache", kind.to_owned())
        .with_header("x-freerelay-provider", a.provider.clone())
        .with_header("x-freerelay-model", a.model.clone())
        .with_header("x-freerelay-attempts", "0".to_owned())
        .with_header("x-freerelay-cost-usd", budget::format_usd(0));
    ctx.reply(out, reply).await;
    ctx.apply(Some(store), &[hit.counter().op()]);
}

/// Stores a complete answer (`stop` or `length`; never a filtered or failed one) in the cache.
fn cache_store(
    ctx: &Ctx,
    store: Option<&kv::SpinKv>,
    key: &cache::Key,
    answer: &cache::Answer,
    policy: &cache::Policy,
) {
    let Some(store) = store else { return };
    if !matches!(answer.finish_reason.as_str(), "stop" | "length") {
        return;
    }
    match cache::store(store, key, answer, policy, now_ms()) {
        Ok(Some(_)) => ctx.apply(Some(store), &[cache::Counter::Stores.op()]),
        Ok(None) => {}
        Err(cache::CacheError::TooLarge { bytes, max }) => {
            ctx.log(&Event::Cache {
                outcome: "too_large",
                similarity: None,
                detail: Some(format!(
                    "{bytes} bytes encoded, the cache keeps at most {max}"
                )),
            });
            ctx.apply(Some(store), &[cache::Counter::TooLarge.op()]);
        }
        Err(e) => ctx.log(&Event::StateWriteFailed {
            key: cache::NEXT_KEY.to_owned(),
            error: e.to_string(),
        }),
    }
}

/// Logs a state failure (state is best effort: serving goes on).
fn state_failed(ctx: &Ctx, key: String, e: freerelay::kv::KvError) {
    ctx.log(&Event::StateWriteFailed {
        key,
        error: e.to_string(),
    });
}

/// An attempt answered: a whole JSON answer (a success for its breaker; its AIMD lease ends), or
/// a stream's first token (`keep`: the lease is returned, to end with the stream, whose end
/// tells its breaker how it went — except a probe's, settled now, within its lease).
fn answered(
    ctx: &Ctx,
    store: Option<&kv::SpinKv>,
    config: &Config,
    snap: &Snapshot,
    c: &Candidate,
    held: Held,
    keep: bool,
) -> Option<aimd::Admitted> {
    let store = store?;
    if held.probe || !keep {
        match edge::breaker_outcome(store, snap, c, false, held.probe, now_ms()) {
            Ok(e) => e.iter().for_each(|e| ctx.log(e)),
            Err(e) => state_failed(
                ctx,
                freerelay::kv::keys::breaker_state(&c.provider, &c.model),
                e,
            ),
        }
    }
    if keep {
        return held.lease;
    }
    end_lease(ctx, Some(store), config, held.lease, true, false);
    None
}

/// An attempt failed: its breaker counts it when it was sent and the failure is the provider's
/// ([`breaker::is_failure`]); a 429 or a timeout halves the provider's AIMD window. When the
/// breaker opens, the request stops asking that model.
#[allow(clippy::too_many_arguments)]
fn failed(
    ctx: &Ctx,
    store: Option<&kv::SpinKv>,
    config: &Config,
    snap: &Snapshot,
    attempts: &mut Attempts,
    c: &Candidate,
    held: Held,
    failure: &Failure,
    sent: bool,
) {
    let Some(store) = store else { return };
    let mut opened = false;
    if sent {
        let bad = breaker::is_failure(&failure.cause);
        match edge::breaker_outcome(store, snap, c, bad, held.probe, now_ms()) {
            Ok(Some(e)) => {
                opened = matches!(
                    e,
                    Event::Breaker {
                        transition: "opened" | "reopened",
                        ..
                    }
                );
                ctx.log(&e);
            }
            Ok(None) => {}
            Err(e) => state_failed(
                ctx,
                freerelay::kv::keys::breaker_state(&c.provider, &c.model),
                e,
            ),
        }
    }
    let timed_out = failure.error.status == 504;
    let congestion = sent && aimd::is_congestion(&failure.cause, timed_out);
    if congestion && held.lease.is_none() {
        let now = now_ms();
        let sent_at = now.saturating_sub(ctx.ms());
        match edge::aimd_congestion_unleased(store, &config.edge.aimd, &c.provider, sent_at, now) {
            Ok(e) => e.iter().for_each(|e| ctx.log(e)),
            Err(e) => state_failed(ctx, freerelay::kv::keys::aimd_window(&c.provider), e),
        }
    }
    end_lease(ctx, Some(store), config, held.lease, false, congestion);
    if opened {
        attempts.avoid(&c.provider, &c.model);
    }
}

/// Ends an AIMD lease (see [`edge::aimd_outcome`]).
fn end_lease(
    ctx: &Ctx,
    store: Option<&kv::SpinKv>,
    config: &Config,
    lease: Option<aimd::Admitted>,
    success: bool,
    congestion: bool,
) {
    let (Some(store), Some(lease)) = (store, lease) else {
        return;
    };
    match edge::aimd_outcome(
        store,
        &config.edge.aimd,
        &lease,
        success,
        congestion,
        random_u64(),
        now_ms(),
    ) {
        Ok(e) => e.iter().for_each(|e| ctx.log(e)),
        Err(e) => state_failed(
            ctx,
            freerelay::kv::keys::aimd_window(&lease.lease.provider),
            e,
        ),
    }
}

/// Teaches the router how an attempt went (see [`freerelay::learn`]).
fn learned(
    ctx: &Ctx,
    store: Option<&kv::SpinKv>,
    decision: &freerelay::router::Decision,
    c: &Candidate,
    success: bool,
    quality: f64,
    latency_ms: u64,
) {
    let Some(store) = store else { return };
    let o = freerelay::learn::Outcome {
        success,
        quality,
        latency_ms,
    };
    if let Err(error) = brain::learn(store, c, &decision.family, o, random_u64(), now_ms()) {
        ctx.log(&Event::StateWriteFailed {
            key: format!("learn:v1:{}:{}", c.provider, c.model),
            error,
        });
    }
}

/// Keeps a conversation on the model that served it.
fn stick(
    ctx: &Ctx,
    store: Option<&kv::SpinKv>,
    config: &Config,
    decision: &freerelay::router::Decision,
    c: &Candidate,
) {
    let Some(store) = store else { return };
    let tier = config
        .provider(&c.provider)
        .map_or(freerelay::catalog::Tier::Free, |p| p.tier);
    if let Err(error) = brain::stick(store, decision, c, tier) {
        ctx.log(&Event::StateWriteFailed {
            key: decision.sticky_key.clone().unwrap_or_default(),
            error,
        });
    }
}

/// Adds a priced answer's cost to the budgets (global, tenant, user), exactly.
fn record_spend(
    ctx: &Ctx,
    store: Option<&kv::SpinKv>,
    config: &Config,
    snap: &Snapshot,
    tenant: &Tenant,
    micro: Option<u64>,
) {
    let (Some(store), Some(micro)) = (store, micro.filter(|m| *m > 0)) else {
        return;
    };
    let budgets = &config.edge.budgets;
    if let Err(e) = budget::record_spend(store, budgets, tenant, micro, &snap.health, now_ms()) {
        state_failed(ctx, freerelay::kv::keys::budget("global", "day"), e);
    }
}

/// Counts an answer's tokens against its key's token quotas (best effort, like all state).
fn count_tokens(ctx: &Ctx, store: Option<&kv::SpinKv>, q: Option<&QuotaRef<'_>>, u: Usage) {
    if let (Some(store), Some(q)) = (store, q) {
        if let Err(e) =
            quota::record_usage(store, q, u.prompt_tokens, u.completion_tokens, now_ms())
        {
            ctx.log(&Event::StateWriteFailed {
                key: q.key(quota::Kind::Tpm),
                error: e.to_string(),
            });
        }
    }
}

fn is_timeout(e: &wasi::io::streams::Error) -> bool {
    e.to_debug_string().to_ascii_lowercase().contains("timeout")
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random_u64() -> u64 {
    wasi::random::random::get_random_u64()
}

fn random_16() -> [u8; 16] {
    let (a, b) = (
        wasi::random::random::get_random_u64(),
        wasi::random::random::get_random_u64(),
    );
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_le_bytes());
    out[8..].copy_from_slice(&b.to_le_bytes());
    out
}
