//! The fallback state machine of one request: which candidate to try next, when to give up, and
//! the state changes and events each step decides. Pure: the component performs the I/O and the
//! returned key-value operations, at the moment each is decided.

use crate::error::AttemptSummary;
use crate::event::Event;
use crate::kv::KvOp;
use crate::quota::Class;
use crate::route::{Candidate, Plan};
use crate::stats;
use crate::upstream::{Cause, Failure};
use crate::wire::openai::Usage;
use crate::ApiError;

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Send to this candidate with this key (a fingerprint), after waiting `delay_ms` (a
    /// back-off before retrying the same model, or a short Retry-After waited out); perform
    /// `ops` (its attempt counter) first, log `event`.
    Try {
        attempt: u32,
        candidate: Candidate,
        key: String,
        delay_ms: u64,
        ops: Vec<KvOp>,
        event: Box<Event>,
    },
    /// Nothing more to try: answer with this error.
    GiveUp(ApiError),
}

/// What a failure decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    pub ops: Vec<KvOp>,
    pub events: Vec<Event>,
}

/// The deployment's bounds on one request's walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Upstream attempts one request may make, retries included.
    pub max_attempts: u32,
    /// A 429 asking for at most this wait, with nothing else left, is waited out and retried.
    pub short_retry_after_ms: u64,
    /// The pause before the one retry of a model after a 5xx or a broken connection.
    pub backoff_ms: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            short_retry_after_ms: 5_000,
            backoff_ms: 250,
        }
    }
}

/// One failed attempt, as remembered for the final error.
#[derive(Debug, Clone)]
struct Failed {
    summary: AttemptSummary,
    cause: Cause,
    error: ApiError,
}

/// One request's walk through its plan: each candidate with its keys in order. What a failure
/// leads to depends on its cause: a failure of the key (429, per-day cap, 401/403) moves to the
/// candidate's next key; a 5xx or a broken connection retries the same model once after a short
/// back-off; a context-length error moves to a candidate with a larger window; a content-filter
/// refusal never asks the same model again; a 429 with only a short wait and nothing else left
/// is waited out. Each key is tried at most once per request (retries apart), and
/// [`Policy::max_attempts`] bounds everything: no retry storms.
///
/// The request's [`Class`] ([`Self::with_class`]) decides which cool-down keys its failures
/// write ([`Self::cooldown_op`]): a background request's 429s cool only what background requests
/// read, so they never refuse the user's own request.
#[derive(Debug, Clone)]
pub struct Attempts {
    plan: Plan,
    policy: Policy,
    class: Class,
    /// The next (candidate, key) position to try.
    pos: (usize, usize),
    /// The position of the attempt in flight.
    current: (usize, usize),
    attempt: u32,
    /// Wait before the next attempt.
    delay_ms: u64,
    /// Set when the walk must stop: the error the client gets.
    stop: Option<ApiError>,
    /// Candidates already retried once after a server or transport failure.
    retried: Vec<usize>,
    /// A short Retry-After was already waited out once.
    waited: bool,
    /// After a context-length failure: only windows larger than this are tried.
    min_window: u32,
    /// Models a content filter refused: never asked again in this request.
    banned: Vec<(String, String)>,
    /// Keys benched for every model of their provider in this request: refused by the provider
    /// (401/403), or rate limited where the provider limits per key — their cool-down covers the
    /// provider's other models too, so the plan's later candidates must not try them again.
    benched: Vec<(String, String)>,
    failures: Vec<Failed>,
    /// Why the first candidate passed over ([`Self::pass`]) was.
    passed: Option<ApiError>,
}

impl Attempts {
    pub fn new(plan: Plan) -> Self {
        Self::with_policy(plan, Policy::default())
    }

    pub fn with_policy(plan: Plan, policy: Policy) -> Self {
        Self {
            plan,
            policy,
            class: Class::Foreground,
            pos: (0, 0),
            current: (0, 0),
            attempt: 0,
            delay_ms: 0,
            stop: None,
            retried: Vec::new(),
            waited: false,
            min_window: 0,
            banned: Vec::new(),
            benched: Vec::new(),
            failures: Vec::new(),
            passed: None,
        }
    }

    /// The walk of a request of `class` (foreground unless said otherwise).
    pub fn with_class(mut self, class: Class) -> Self {
        self.class = class;
        self
    }

    /// The request's class.
    pub fn class(&self) -> Class {
        self.class
    }

    /// Attempts started so far.
    pub fn count(&self) -> u32 {
        self.attempt
    }

    /// The next step. Call once at the start, and after each [`Self::failed`].
    pub fn next_step(&mut self) -> Next {
        if let Some(e) = self.stop.take() {
            self.pos = (self.plan.candidates.len(), 0);
            return Next::GiveUp(e);
        }
        if self.attempt >= self.policy.max_attempts {
            return Next::GiveUp(self.all_failed(Some("the request's attempt budget is spent")));
        }
        let Some((candidate, key)) = self.at(self.pos) else {
            return Next::GiveUp(self.all_failed(None));
        };
        self.current = self.pos;
        self.pos.1 += 1;
        self.attempt += 1;
        Next::Try {
            attempt: self.attempt,
            delay_ms: std::mem::take(&mut self.delay_ms),
            ops: vec![stats::attempt_started(&candidate.provider)],
            event: Box::new(Event::AttemptStart {
                attempt: self.attempt,
                provider: candidate.provider.clone(),
                model: candidate.model.clone(),
                key: key.clone(),
            }),
            candidate,
            key,
        }
    }

    /// Passes over the candidate just handed out by [`Self::next_step`] without sending anything
    /// (its breaker's probe is taken, or its provider is over its concurrency window): the
    /// attempt is not counted, and the walk goes on with the next candidate.
    /// `why` is what the client gets if nothing after it answers and nothing failed before.
    pub fn pass(&mut self, why: ApiError) {
        self.attempt = self.attempt.saturating_sub(1);
        self.pos = (self.current.0 + 1, 0);
        self.passed.get_or_insert(why);
    }

    /// Is there an eligible candidate after the one just handed out?
    pub fn others_left(&self) -> bool {
        self.plan
            .candidates
            .iter()
            .skip(self.current.0 + 1)
            .any(|c| self.eligible(c) && !c.keys.is_empty())
    }

    /// Never tries this model again in this request (its breaker opened during the request).
    pub fn avoid(&mut self, provider: &str, model: &str) {
        self.banned.push((provider.to_owned(), model.to_owned()));
    }

    /// May this candidate still be tried (window large enough, model not refused)?
    fn eligible(&self, c: &Candidate) -> bool {
        (self.min_window == 0 || c.context_window > self.min_window)
            && !self
                .banned
                .iter()
                .any(|(p, m)| *p == c.provider && *m == c.model)
    }

    /// The first eligible candidate and key at or after `pos`, moving on to the next candidate
    /// past a last key; sets the position there.
    fn at(&mut self, pos: (usize, usize)) -> Option<(Candidate, String)> {
        let (mut ci, mut ki) = pos;
        loop {
            let c = self.plan.candidates.get(ci)?;
            if self.eligible(c) {
                while let Some(k) = c.keys.get(ki) {
                    if self.benched.iter().any(|(p, b)| *p == c.provider && b == k) {
                        ki += 1;
                        continue;
                    }
                    self.pos = (ci, ki);
                    return Some((c.clone(), k.clone()));
                }
            }
            ci += 1;
            ki = 0;
        }
    }

    /// The current attempt (with `key`) failed before any byte reached the client
    /// (`upstream_status`: the upstream's status when it answered). Decides what is tried next.
    pub fn failed(
        &mut self,
        candidate: &Candidate,
        key: &str,
        failure: Failure,
        upstream_status: Option<u16>,
        ms: u64,
    ) -> Decided {
        let mut ops = Vec::with_capacity(2);
        let mut events = Vec::with_capacity(3);
        ops.extend(Self::cooldown_op(candidate, key, &failure, self.class));
        ops.push(stats::attempt_failed(&candidate.provider));
        events.push(Event::AttemptFailed {
            attempt: self.attempt,
            provider: candidate.provider.clone(),
            model: candidate.model.clone(),
            upstream_status,
            status: failure.error.status,
            reason: failure.error.message.clone(),
            retryable: failure.retryable,
            cooldown_until_ms: failure.cooldown.map(|c| c.until_ms),
            ms,
        });
        let whole_key = failure.key_refused()
            || (matches!(failure.cause, Cause::RateLimited | Cause::DailyCap)
                && candidate.ledger.is_none());
        if whole_key {
            self.benched
                .push((candidate.provider.clone(), key.to_owned()));
        }
        if failure.key_refused() {
            events.push(Event::KeySetAside {
                provider: candidate.provider.clone(),
                key: key.to_owned(),
                status: upstream_status.unwrap_or(0),
                until_ms: failure.cooldown.map_or(0, |c| c.until_ms),
            });
        }
        self.failures.push(Failed {
            summary: AttemptSummary {
                provider: candidate.provider.clone(),
                model: candidate.model.clone(),
                status: upstream_status,
                reason: failure.error.message.clone(),
            },
            cause: failure.cause,
            error: failure.error.clone(),
        });

        let (ci, ki) = self.current;
        let next = if !failure.retryable {
            None
        } else {
            match failure.cause {
                Cause::RateLimited | Cause::DailyCap | Cause::KeyRefused => {
                    match self.at((ci, ki + 1)) {
                        Some(n) => Some(n),
                        None => {
                            // Nothing else left: a short wait is waited out, once.
                            let wait = failure.error.retry_after.map(|s| s * 1000);
                            match wait {
                                Some(w)
                                    if failure.cause == Cause::RateLimited
                                        && !self.waited
                                        && w <= self.policy.short_retry_after_ms =>
                                {
                                    self.waited = true;
                                    self.delay_ms = w;
                                    self.at((ci, ki))
                                }
                                _ => None,
                            }
                        }
                    }
                }
                Cause::Server | Cause::Transport if !self.retried.contains(&ci) => {
                    self.retried.push(ci);
                    self.delay_ms = self.policy.backoff_ms;
                    self.at((ci, ki))
                }
                Cause::ContextLength => {
                    self.min_window = self.min_window.max(candidate.context_window.max(1));
                    self.at((ci + 1, 0))
                }
                Cause::ContentFilter => {
                    self.banned
                        .push((candidate.provider.clone(), candidate.model.clone()));
                    self.at((ci + 1, 0))
                }
                _ => self.at((ci + 1, 0)),
            }
        };
        if self.attempt >= self.policy.max_attempts && next.is_some() {
            self.stop = Some(self.all_failed(Some("the request's attempt budget is spent")));
            return Decided { ops, events };
        }
        match next {
            Some((to, to_key)) => events.push(Event::Fallback {
                from: format!("{}/{}", candidate.provider, candidate.model),
                to: format!("{}/{}", to.provider, to.model),
                reason: if to.provider == candidate.provider && to.model == candidate.model {
                    if to_key == key {
                        format!(
                            "HTTP {}; retry after {} ms",
                            failure.error.status, self.delay_ms
                        )
                    } else {
                        format!("HTTP {}; next key {to_key}", failure.error.status)
                    }
                } else {
                    format!("HTTP {}", failure.error.status)
                },
            }),
            None => {
                self.stop = Some(if failure.retryable {
                    self.all_failed(None)
                } else {
                    with_retry_text(failure.error)
                })
            }
        }
        Decided { ops, events }
    }

    /// The one error for a request whose every attempt failed: the last failure's when there
    /// was one attempt; otherwise every attempt listed, as a 429 with the shortest wait when
    /// all were rate limited.
    fn all_failed(&self, why: Option<&str>) -> ApiError {
        let Some(last) = self.failures.last() else {
            return self
                .passed
                .clone()
                .unwrap_or_else(|| ApiError::internal("no candidate left to try"));
        };
        if self.failures.len() == 1 && why.is_none() {
            return with_retry_text(last.error.clone());
        }
        let limited = self
            .failures
            .iter()
            .all(|f| matches!(f.cause, Cause::RateLimited | Cause::DailyCap));
        let list = self
            .failures
            .iter()
            .map(|f| {
                let status = f
                    .summary
                    .status
                    .map_or_else(|| "no answer".to_owned(), |s| format!("HTTP {s}"));
                format!(
                    "{}/{} ({status}): {}",
                    f.summary.provider, f.summary.model, f.summary.reason
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let n = self.failures.len();
        let head = match why {
            Some(why) => format!("{n} upstream attempts failed and {why}"),
            None => format!("All {n} upstream attempts failed"),
        };
        let mut e = if limited {
            let shortest = self
                .failures
                .iter()
                .filter_map(|f| f.error.retry_after)
                .min();
            ApiError::rate_limited(format!("{head}: {list}"), shortest)
        } else {
            let mut e = last.error.clone();
            e.message = format!("{head}: {list}");
            e
        };
        e.attempts = self.failures.iter().map(|f| f.summary.clone()).collect();
        with_retry_text(e)
    }

    /// The cool-down a failure of a request of `class` asks for, under its key: the whole key
    /// for a refused key (401/403: the key's fault, shared by every class), else the key's model
    /// or pool (the candidate's ledger), as the provider counts its limits — under the
    /// background-only key when a background request provoked it ([`crate::cooldown::key`]).
    pub fn cooldown_op(
        candidate: &Candidate,
        key: &str,
        failure: &Failure,
        class: Class,
    ) -> Option<KvOp> {
        let (ledger, class) = if failure.key_refused() {
            (None, Class::Foreground)
        } else {
            (candidate.ledger.as_deref(), class)
        };
        failure.cooldown.map(|cd| {
            cd.op(crate::cooldown::key(
                &candidate.provider,
                key,
                ledger,
                class,
            ))
        })
    }

    /// The usage of the answer, the moment it is known.
    pub fn usage(candidate: &Candidate, usage: Usage) -> Vec<KvOp> {
        stats::usage(&candidate.provider, usage)
    }

    /// A stream broke after its 200 reached the client: the attempt counts as failed.
    pub fn broke_after_commit(candidate: &Candidate) -> Vec<KvOp> {
        vec![stats::attempt_failed(&candidate.provider)]
    }

    /// The client went away before the answer was complete.
    pub fn client_gone(candidate: &Candidate) -> Vec<KvOp> {
        vec![stats::client_gone(&candidate.provider)]
    }
}

/// Chat UIs (OpenWebUI) show an error's message and never its headers: a rate-limited error
/// says in words how long to wait.
fn with_retry_text(mut e: ApiError) -> ApiError {
    if let Some(secs) = e.retry_after {
        if !e.message.contains("etry after") {
            let unit = if secs == 1 { "second" } else { "seconds" };
            e.message = format!("{} Retry after {secs} {unit}.", e.message.trim_end());
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::config_of;
    use crate::config::ApiKey;
    use crate::cooldown::Cooldown;
    use crate::kv::{apply, decode_counter, keys, Kv, MemKv};
    use crate::route;
    use crate::upstream::{self, Hints, Transport};

    /// What a scripted upstream does with one attempt.
    enum Script {
        Answer(Usage),
        Status(u16, Option<&'static str>),
        Transport(Transport),
    }

    /// Drives a request through its plan against scripted upstreams, performing every decided
    /// operation on `kv` as the component does. Returns (provider that answered or the error,
    /// events).
    fn drive(
        kv: &MemKv,
        model: &str,
        providers: &[&str],
        script: Vec<Script>,
        now: u64,
    ) -> (Result<String, ApiError>, Vec<Event>) {
        drive_as(kv, model, providers, script, now, Class::Foreground)
    }

    /// [`drive`] for a request of `class`.
    fn drive_as(
        kv: &MemKv,
        model: &str,
        providers: &[&str],
        mut script: Vec<Script>,
        now: u64,
        class: Class,
    ) -> (Result<String, ApiError>, Vec<Event>) {
        // `groq` has the key `key-groq`; `groq=a,b` has the keys `a` and `b`.
        let pairs: Vec<(String, String)> = providers
            .iter()
            .map(|p| match p.split_once('=') {
                Some((p, keys)) => (format!("{p}_api_key"), keys.to_owned()),
                None => (format!("{p}_api_key"), format!("key-{p}")),
            })
            .collect();
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(a, b)| (&**a, &**b)).collect();
        let config = config_of(&pairs).unwrap();
        let plan = route::plan(&config, model, 0).unwrap();
        let state = kv.get_many(&plan.state_keys(&config, class)).unwrap();
        let plan = match plan.usable(&config, &state, 10, now, class) {
            Ok((p, ops)) => {
                ops.iter().for_each(|op| apply(kv, op).unwrap());
                p
            }
            Err(e) => {
                apply(kv, &stats::refused()).unwrap();
                return (Err(e), vec![]);
            }
        };
        let mut events = vec![];
        let mut attempts = Attempts::new(plan).with_class(class);
        script.reverse();
        loop {
            match attempts.next_step() {
                Next::GiveUp(e) => return (Err(e), events),
                Next::Try {
                    candidate,
                    key: key_id,
                    ops,
                    event,
                    ..
                } => {
                    ops.iter().for_each(|op| apply(kv, op).unwrap());
                    events.push(*event);
                    let configured = config.provider(&candidate.provider).unwrap();
                    let key = configured.key(&key_id).unwrap().secret().to_owned();
                    let (failure, status) = match script.pop().expect("script too short") {
                        Script::Answer(u) => {
                            for op in Attempts::usage(&candidate, u) {
                                apply(kv, &op).unwrap();
                            }
                            return (Ok(candidate.provider), events);
                        }
                        Script::Status(s, retry_after) => (
                            upstream::judge_status(
                                &candidate.provider,
                                &key,
                                s,
                                Hints {
                                    retry_after,
                                    ..Default::default()
                                },
                                None,
                                now,
                            ),
                            Some(s),
                        ),
                        Script::Transport(t) => (
                            upstream::judge_transport(&candidate.provider, &key, &t),
                            None,
                        ),
                    };
                    let d = attempts.failed(&candidate, &key_id, failure, status, 5);
                    d.ops.iter().for_each(|op| apply(kv, op).unwrap());
                    events.extend(d.events);
                }
            }
        }
    }

    /// The cool-down key of a provider's key (by its secret) and ledger.
    fn cd_key(provider: &str, secret: &str, ledger: Option<&str>) -> String {
        keys::cooldown(provider, &ApiKey::new(secret).id, ledger)
    }

    fn counter(kv: &MemKv, key: &str) -> i64 {
        kv.get(key)
            .unwrap()
            .as_deref()
            .and_then(decode_counter)
            .unwrap_or(0)
    }

    const USAGE: Usage = Usage {
        prompt_tokens: 7,
        completion_tokens: 3,
    };

    #[test]
    fn a_key_benched_for_its_whole_provider_is_not_tried_again_on_its_other_models() {
        // A group of two Groq models on one key pool of two keys: the provider refuses both keys
        // (401). Each key is tried once, not once per model.
        let config = config_of(&[
            ("groq_api_key", "dead-1,dead-2"),
            (
                "model_groups",
                "g=groq/llama-3.1-8b-instant,groq/llama-3.3-70b-versatile",
            ),
        ])
        .unwrap();
        let plan = route::plan(&config, "g", 0).unwrap();
        assert_eq!(plan.candidates.len(), 2);
        let mut attempts = Attempts::new(plan);
        let mut tried = Vec::new();
        loop {
            match attempts.next_step() {
                Next::Try { candidate, key, .. } => {
                    tried.push((candidate.model.clone(), key.clone()));
                    let failure = upstream::judge_status(
                        "groq",
                        &key,
                        401,
                        Hints::default(),
                        Some("Invalid API Key"),
                        0,
                    );
                    attempts.failed(&candidate, &key, failure, Some(401), 1);
                }
                Next::GiveUp(e) => {
                    assert_eq!(e.status, 502, "{e:?}");
                    break;
                }
            }
        }
        let keys: Vec<&str> = tried.iter().map(|(_, k)| k.as_str()).collect();
        assert_eq!(tried.len(), 2, "{tried:?}");
        assert_ne!(keys[0], keys[1]);
    }

    #[test]
    fn a_429_cools_the_provider_at_once_and_the_next_one_answers() {
        let kv = MemKv::default();
        let (who, events) = drive(
            &kv,
            "auto",
            &["groq", "mistral"],
            vec![Script::Status(429, Some("30")), Script::Answer(USAGE)],
            1_000,
        );
        assert_eq!(who.unwrap(), "mistral");
        let cd = Cooldown::decode(
            &kv.get(&cd_key("groq", "key-groq", Some("llama-3.1-8b-instant")))
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(cd.until_ms, 31_000);
        assert_eq!(counter(&kv, "stats:v1:groq:requests"), 1);
        assert_eq!(counter(&kv, "stats:v1:groq:errors"), 1);
        assert_eq!(counter(&kv, "stats:v1:mistral:requests"), 1);
        assert_eq!(counter(&kv, "stats:v1:mistral:prompt_tokens"), 7);
        assert_eq!(counter(&kv, "stats:v1:mistral:completion_tokens"), 3);
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Fallback { to, .. } if to.starts_with("mistral/"))));
        // The next request skips the cooling provider without sending to it.
        let (who, events) = drive(
            &kv,
            "auto",
            &["groq", "mistral"],
            vec![Script::Answer(USAGE)],
            2_000,
        );
        assert_eq!(who.unwrap(), "mistral");
        assert_eq!(events.len(), 1);
        assert_eq!(counter(&kv, "stats:v1:groq:requests"), 1);
    }

    /// The background-only cool-down key of a provider's key (by its secret) and ledger.
    fn bg_key(provider: &str, secret: &str, ledger: Option<&str>) -> String {
        keys::cooldown_bg(provider, &ApiKey::new(secret).id, ledger)
    }

    #[test]
    fn a_background_429_never_refuses_the_users_message_that_follows() {
        // One free provider: the title call's 429…
        let kv = MemKv::default();
        let model = "groq/llama-3.1-8b-instant";
        let ledger = Some("llama-3.1-8b-instant");
        let (who, events) = drive_as(
            &kv,
            model,
            &["groq"],
            vec![Script::Status(429, Some("30"))],
            1_000,
            Class::Background,
        );
        assert_eq!(who.unwrap_err().status, 429);
        assert!(events.iter().any(|e| matches!(
            e,
            Event::AttemptFailed {
                cooldown_until_ms: Some(31_000),
                ..
            }
        )));
        // …cools only what background requests read.
        assert!(kv
            .get(&cd_key("groq", "key-groq", ledger))
            .unwrap()
            .is_none());
        assert!(kv.get(&cd_key("groq", "key-groq", None)).unwrap().is_none());
        let cd = Cooldown::decode(
            &kv.get(&bg_key("groq", "key-groq", ledger))
                .unwrap()
                .unwrap(),
        );
        assert_eq!(cd.map(|c| (c.until_ms, c.status)), Some((31_000, 429)));
        // The user's message is sent, and answered.
        let (who, events) = drive(&kv, model, &["groq"], vec![Script::Answer(USAGE)], 2_000);
        assert_eq!(who.unwrap(), "groq");
        assert!(matches!(events[0], Event::AttemptStart { .. }));
        assert_eq!(counter(&kv, "stats:v1:groq:requests"), 2);
        // The next background request honours its cool-down: refused without being sent.
        let (who, events) = drive_as(&kv, model, &["groq"], vec![], 2_000, Class::Background);
        assert_eq!(who.unwrap_err().retry_after, Some(29));
        assert!(events.is_empty());
        assert_eq!(counter(&kv, "stats:v1:groq:requests"), 2);
        // A foreground 429 still cools the key for everyone.
        let (who, _) = drive(
            &kv,
            model,
            &["groq"],
            vec![Script::Status(429, Some("60"))],
            3_000,
        );
        assert_eq!(who.unwrap_err().status, 429);
        assert!(kv
            .get(&cd_key("groq", "key-groq", ledger))
            .unwrap()
            .is_some());
        for class in [Class::Foreground, Class::Background] {
            let (who, events) = drive_as(&kv, model, &["groq"], vec![], 4_000, class);
            assert_eq!(who.unwrap_err().retry_after, Some(59), "{class:?}");
            assert!(events.is_empty());
        }
    }

    #[test]
    fn a_background_request_moves_on_after_its_429_and_keys_refused_stay_shared() {
        let kv = MemKv::default();
        // A per-key limit (NVIDIA) cools the whole key, for background requests only.
        let (who, _) = drive_as(
            &kv,
            "auto",
            &["nvidia", "together"],
            vec![Script::Status(429, Some("30")), Script::Answer(USAGE)],
            0,
            Class::Background,
        );
        assert_eq!(who.unwrap(), "together");
        assert!(kv
            .get(&bg_key("nvidia", "key-nvidia", None))
            .unwrap()
            .is_some());
        assert!(kv
            .get(&cd_key("nvidia", "key-nvidia", None))
            .unwrap()
            .is_none());
        let (who, _) = drive(
            &kv,
            "auto",
            &["nvidia", "together"],
            vec![Script::Answer(USAGE)],
            1_000,
        );
        assert_eq!(who.unwrap(), "nvidia");
        // A key the provider refuses is refused for everyone, whoever found out.
        let (who, _) = drive_as(
            &kv,
            "groq/llama-3.3-70b-versatile",
            &["groq=bad,good"],
            vec![Script::Status(401, None), Script::Answer(USAGE)],
            0,
            Class::Background,
        );
        assert_eq!(who.unwrap(), "groq");
        let cd = Cooldown::decode(&kv.get(&cd_key("groq", "bad", None)).unwrap().unwrap());
        assert_eq!(cd.map(|c| c.status), Some(401));
        assert!(kv.get(&bg_key("groq", "bad", None)).unwrap().is_none());
        let (_, events) = drive(
            &kv,
            "groq/llama-3.3-70b-versatile",
            &["groq=bad,good"],
            vec![Script::Answer(USAGE)],
            1_000,
        );
        assert!(
            matches!(&events[0], Event::AttemptStart { key, .. } if *key == ApiKey::new("good").id)
        );
    }

    #[test]
    fn the_class_chooses_the_cool_down_key_and_never_the_key_set_aside() {
        let c = Candidate {
            provider: "groq".into(),
            model: "m".into(),
            ledger: Some("m".into()),
            keys: vec!["k1".into()],
            reason: String::new(),
            context_window: 8_192,
            prefill: false,
        };
        let judged = |status| {
            upstream::judge_status(
                "groq",
                "k",
                status,
                Hints {
                    retry_after: Some("9"),
                    ..Default::default()
                },
                None,
                0,
            )
        };
        let key_of = |status, class| {
            Attempts::cooldown_op(&c, "k1", &judged(status), class).map(|op| op.key().to_owned())
        };
        assert_eq!(
            key_of(429, Class::Foreground).as_deref(),
            Some("cooldown:v1:groq:k1:m")
        );
        assert_eq!(
            key_of(429, Class::Background).as_deref(),
            Some("cooldown:v1:bg:groq:k1:m")
        );
        for class in [Class::Foreground, Class::Background] {
            assert_eq!(key_of(403, class).as_deref(), Some("cooldown:v1:groq:k1"));
            assert_eq!(key_of(503, class), None);
        }
        let plan = Plan {
            candidates: vec![c],
            virtual_model: false,
        };
        assert_eq!(Attempts::new(plan.clone()).class(), Class::Foreground);
        let a = Attempts::new(plan).with_class(Class::Background);
        assert_eq!(a.class(), Class::Background);
    }

    #[test]
    fn a_shorter_retry_after_from_a_later_request_keeps_the_longer_cooldown() {
        let kv = MemKv::default();
        let _ = drive(
            &kv,
            "groq/llama-3.1-8b-instant",
            &["groq"],
            vec![Script::Status(429, Some("60"))],
            0,
        );
        // Another instance, which read the store before that write, was told 2 s.
        let plan = route::plan(
            &config_of(&[("groq_api_key", "key-groq")]).unwrap(),
            "auto",
            0,
        )
        .unwrap();
        let mut a = Attempts::new(plan);
        let Next::Try { candidate, key, .. } = a.next_step() else {
            panic!()
        };
        let f = upstream::judge_status(
            "groq",
            "k",
            429,
            Hints {
                retry_after: Some("2"),
                ..Default::default()
            },
            None,
            500,
        );
        for op in a.failed(&candidate, &key, f, Some(429), 1).ops {
            apply(&kv, &op).unwrap();
        }
        let cd = Cooldown::decode(
            &kv.get(&cd_key("groq", "key-groq", Some("llama-3.1-8b-instant")))
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(cd.until_ms, 60_000);
    }

    #[test]
    fn every_candidate_cooling_is_refused_locally_and_counted() {
        let kv = MemKv::default();
        kv.set(
            &cd_key("groq", "key-groq", Some("llama-3.1-8b-instant")),
            &Cooldown::new(0, 9_000, 429).encode(),
        )
        .unwrap();
        let (who, _) = drive(&kv, "auto", &["groq"], vec![], 1_000);
        let e = who.unwrap_err();
        assert_eq!((e.status, e.retry_after), (429, Some(8)));
        assert_eq!(counter(&kv, "stats:v1:gateway:refused"), 1);
        assert_eq!(counter(&kv, "stats:v1:groq:requests"), 0);
    }

    #[test]
    fn client_errors_stop_the_walk_and_transport_failures_move_on() {
        let kv = MemKv::default();
        let (who, _) = drive(
            &kv,
            "auto",
            &["groq", "mistral"],
            vec![Script::Status(400, None)],
            0,
        );
        assert_eq!(who.unwrap_err().status, 400);
        assert_eq!(counter(&kv, "stats:v1:mistral:requests"), 0);
        // A timeout and a 5xx: each model is retried once, then the next one answers.
        let (who, events) = drive(
            &kv,
            "auto",
            &["groq", "mistral", "openai"],
            vec![
                Script::Transport(Transport::Timeout),
                Script::Transport(Transport::Timeout),
                Script::Status(503, None),
                Script::Status(503, None),
                Script::Answer(USAGE),
            ],
            0,
        );
        assert_eq!(who.unwrap(), "openai");
        let tried: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::AttemptStart { provider, .. } => Some(provider.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(tried, ["groq", "groq", "mistral", "mistral", "openai"]);
        assert!(
            kv.get(&cd_key(
                "mistral",
                "key-mistral",
                Some("mistral-small-latest")
            ))
            .unwrap()
            .is_none(),
            "5xx is not a cool-down"
        );
    }

    #[test]
    fn the_last_failure_is_what_the_client_gets() {
        let kv = MemKv::default();
        let (who, events) = drive(
            &kv,
            "auto",
            &["groq", "mistral"],
            vec![
                Script::Status(500, None),
                Script::Status(500, None),
                Script::Transport(Transport::Timeout),
                Script::Transport(Transport::Timeout),
            ],
            0,
        );
        let e = who.unwrap_err();
        assert_eq!(e.status, 504, "the last failure's status");
        assert_eq!(e.attempts.len(), 4, "every attempt is listed");
        assert!(e.message.starts_with("All 4 upstream attempts failed"));
        assert!(e.message.contains("groq/llama-3.1-8b-instant (HTTP 500)"));
        assert!(e
            .message
            .contains("mistral/mistral-small-latest (no answer)"));
        let failed = events
            .iter()
            .filter(|e| matches!(e, Event::AttemptFailed { .. }))
            .count();
        assert_eq!(failed, 4);
        assert_eq!(counter(&kv, "stats:v1:groq:errors"), 2);
        assert_eq!(counter(&kv, "stats:v1:mistral:errors"), 2);
    }

    #[test]
    fn zero_usage_writes_nothing_more() {
        let c = Candidate {
            provider: "groq".into(),
            model: "m".into(),
            ledger: None,
            keys: vec![],
            reason: String::new(),
            context_window: 8_192,
            prefill: false,
        };
        assert!(Attempts::usage(&c, Usage::default()).is_empty());
        assert_eq!(Attempts::usage(&c, USAGE).len(), 2);
    }

    #[test]
    fn a_rate_limited_key_gives_way_to_the_next_key_of_the_same_model() {
        let kv = MemKv::default();
        let (who, events) = drive(
            &kv,
            "groq/llama-3.3-70b-versatile",
            &["groq=ka,kb"],
            vec![Script::Status(429, Some("30")), Script::Answer(USAGE)],
            0,
        );
        assert_eq!(who.unwrap(), "groq");
        let keys: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::AttemptStart { key, .. } => Some(key.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(keys, [ApiKey::new("ka").id, ApiKey::new("kb").id]);
        // Groq limits per model: only that model of that key cools; its siblings and the
        // other key do not.
        let model_cd = cd_key("groq", "ka", Some("llama-3.3-70b-versatile"));
        assert!(kv.get(&model_cd).unwrap().is_some());
        assert!(kv.get(&cd_key("groq", "ka", None)).unwrap().is_none());
        let (who, events) = drive(
            &kv,
            "groq/llama-3.1-8b-instant",
            &["groq=ka,kb"],
            vec![Script::Answer(USAGE)],
            1_000,
        );
        assert_eq!(who.unwrap(), "groq");
        assert!(
            matches!(&events[0], Event::AttemptStart { key, .. } if *key == ApiKey::new("ka").id)
        );
        // The cooled model is still served, by the other key, without trying the first.
        let (_, events) = drive(
            &kv,
            "groq/llama-3.3-70b-versatile",
            &["groq=ka,kb"],
            vec![Script::Answer(USAGE)],
            1_000,
        );
        assert!(
            matches!(&events[0], Event::AttemptStart { key, .. } if *key == ApiKey::new("kb").id)
        );
    }

    #[test]
    fn a_refused_key_is_set_aside_for_every_model_and_never_retried() {
        let kv = MemKv::default();
        let (who, events) = drive(
            &kv,
            "auto",
            &["groq=bad,good", "mistral"],
            vec![Script::Status(401, None), Script::Answer(USAGE)],
            0,
        );
        assert_eq!(who.unwrap(), "groq");
        assert!(events.iter().any(|e| matches!(e,
            Event::KeySetAside { key, status: 401, until_ms, .. }
                if *key == ApiKey::new("bad").id && *until_ms == upstream::KEY_SET_ASIDE_MS)));
        let cd = Cooldown::decode(&kv.get(&cd_key("groq", "bad", None)).unwrap().unwrap());
        assert_eq!(cd.map(|c| c.status), Some(401));
        // Later requests, for any model, skip the bad key without sending to it.
        for model in ["groq/llama-3.3-70b-versatile", "auto"] {
            let (_, events) = drive(
                &kv,
                model,
                &["groq=bad,good", "mistral"],
                vec![Script::Answer(USAGE)],
                60_000,
            );
            assert!(
                matches!(&events[0], Event::AttemptStart { key, .. } if *key == ApiKey::new("good").id)
            );
        }
        // Every key refused: a 502 that says so, without a request upstream.
        let (who, events) = drive(
            &kv,
            "groq/llama-3.1-8b-instant",
            &["groq=bad"],
            vec![],
            60_000,
        );
        let e = who.unwrap_err();
        assert_eq!(e.status, 502);
        assert!(e.message.contains("401/403") && events.is_empty());
    }

    #[test]
    fn a_pool_cools_every_model_in_it_and_a_server_error_skips_the_other_keys() {
        let kv = MemKv::default();
        let _ = drive(
            &kv,
            "openrouter/qwen/qwen3-coder:free",
            &["openrouter=ka"],
            vec![Script::Status(429, Some("60"))],
            0,
        );
        assert!(kv
            .get(&cd_key("openrouter", "ka", Some("@free")))
            .unwrap()
            .is_some());
        let (who, _) = drive(
            &kv,
            "openrouter/meta-llama/llama-3.3-70b-instruct:free",
            &["openrouter=ka"],
            vec![],
            1_000,
        );
        assert_eq!(who.unwrap_err().status, 429, "the whole :free pool cools");
        // A 5xx is the provider's, not the key's: the model is retried once with the same
        // key, then the next candidate; the other key is not tried.
        let (who, events) = drive(
            &kv,
            "auto",
            &["groq=ka,kb", "mistral"],
            vec![
                Script::Status(503, None),
                Script::Status(503, None),
                Script::Answer(USAGE),
            ],
            0,
        );
        assert_eq!(who.unwrap(), "mistral");
        let keys: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::AttemptStart { key, .. } => Some(key.as_str()),
                _ => None,
            })
            .collect();
        let ka = ApiKey::new("ka").id;
        assert_eq!(keys[..2], [ka.as_str(), ka.as_str()]);
        assert_eq!(keys.len(), 3);
    }

    /// The (provider, model, delay) of each try, and how the walk ended.
    type Walked = (Vec<(String, String, u64)>, Result<String, ApiError>);

    /// Walks `model`'s plan with `policy`, failing each attempt with the next of `failures`
    /// (a `None` answers). Returns the tries (provider, model, delay) and the outcome.
    fn walk(
        pairs: &[(&str, &str)],
        model: &str,
        policy: Policy,
        failures: Vec<Option<Failure>>,
    ) -> Walked {
        let config = config_of(pairs).unwrap();
        let plan = route::plan(&config, model, 0).unwrap();
        let mut a = Attempts::with_policy(plan, policy);
        let mut tries = vec![];
        let mut failures = failures.into_iter();
        loop {
            match a.next_step() {
                Next::GiveUp(e) => return (tries, Err(e)),
                Next::Try {
                    candidate,
                    key,
                    delay_ms,
                    ..
                } => {
                    tries.push((
                        candidate.provider.clone(),
                        candidate.model.clone(),
                        delay_ms,
                    ));
                    match failures.next().expect("script too short") {
                        None => return (tries, Ok(candidate.provider)),
                        Some(f) => {
                            let status = Some(f.error.status);
                            a.failed(&candidate, &key, f, status, 1);
                        }
                    }
                }
            }
        }
    }

    fn rate_limited(secs: &str) -> Failure {
        upstream::judge_status(
            "p",
            "k",
            429,
            Hints {
                retry_after: Some(secs),
                ..Default::default()
            },
            None,
            0,
        )
    }

    fn caused(status: u16, cause: Cause) -> Failure {
        let mut f = upstream::judge_status("p", "k", status, Hints::default(), None, 0);
        f.cause = cause;
        f.retryable = true;
        f
    }

    #[test]
    fn a_short_retry_after_is_waited_out_only_when_nothing_else_is_left() {
        let one = [("groq_api_key", "g")];
        let (tries, r) = walk(
            &one,
            "groq/llama-3.1-8b-instant",
            Policy::default(),
            vec![Some(rate_limited("2")), None],
        );
        assert!(r.is_ok());
        assert_eq!(tries[1].2, 2_000, "waited 2 s, then the same model");
        // A long wait is not waited out: the client gets it, in the header and in words.
        let (tries, r) = walk(
            &one,
            "groq/llama-3.1-8b-instant",
            Policy::default(),
            vec![Some(rate_limited("30"))],
        );
        let e = r.unwrap_err();
        assert_eq!((tries.len(), e.status, e.retry_after), (1, 429, Some(30)));
        assert!(
            e.message.contains("Retry after 30 seconds."),
            "{}",
            e.message
        );
        // With another candidate: no wait at all.
        let two = [("groq_api_key", "g"), ("mistral_api_key", "m")];
        let (tries, r) = walk(
            &two,
            "auto",
            Policy::default(),
            vec![Some(rate_limited("2")), None],
        );
        assert_eq!(r.unwrap(), "mistral");
        assert_eq!(tries[1].2, 0);
    }

    #[test]
    fn all_rate_limited_is_one_429_with_the_shortest_wait() {
        let two = [("groq_api_key", "g"), ("mistral_api_key", "m")];
        let (_, r) = walk(
            &two,
            "auto",
            Policy::default(),
            vec![Some(rate_limited("40")), Some(rate_limited("12"))],
        );
        let e = r.unwrap_err();
        assert_eq!((e.status, e.retry_after), (429, Some(12)));
        assert_eq!(e.attempts.len(), 2);
        assert_eq!(e.attempts[0].status, Some(429));
        assert!(e.message.contains("Retry after 12 seconds."));
    }

    #[test]
    fn context_length_moves_to_a_larger_window_and_content_filters_to_another_model() {
        let c = config_of(&[
            ("groq_api_key", "g"),
            ("gemini_api_key", "x"),
            ("model_groups", "long=groq/llama-3.1-8b-instant,groq/llama-3.3-70b-versatile,gemini/gemini-2.5-flash"),
        ])
        .unwrap();
        let plan = route::plan(&c, "long", 0).unwrap();
        let mut a = Attempts::new(plan);
        let Next::Try { candidate, key, .. } = a.next_step() else {
            panic!()
        };
        a.failed(
            &candidate,
            &key,
            caused(400, Cause::ContextLength),
            Some(400),
            1,
        );
        let Next::Try { candidate, .. } = a.next_step() else {
            panic!()
        };
        // The 70b has the same 131k window as the 8b: skipped for the 1M one.
        assert_eq!(candidate.model, "gemini-2.5-flash");

        // A content filter: the other key of the same model is not asked; the next model is.
        let (tries, r) = walk(
            &[("groq_api_key", "a,b"), ("mistral_api_key", "m")],
            "auto",
            Policy::default(),
            vec![Some(caused(400, Cause::ContentFilter)), None],
        );
        assert_eq!(r.unwrap(), "mistral");
        assert_eq!(tries.len(), 2);
    }

    #[test]
    fn the_attempt_budget_bounds_everything() {
        let pairs = [
            ("groq_api_key", "g"),
            ("mistral_api_key", "m"),
            ("cerebras_api_key", "c"),
            ("nvidia_api_key", "n"),
        ];
        let policy = Policy {
            max_attempts: 3,
            ..Policy::default()
        };
        let fail = || Some(caused(503, Cause::Server));
        let (tries, r) = walk(&pairs, "auto", policy, vec![fail(), fail(), fail(), fail()]);
        assert_eq!(tries.len(), 3);
        let e = r.unwrap_err();
        assert!(e.message.contains("attempt budget"), "{}", e.message);
        assert_eq!(e.attempts.len(), 3);
    }
}
