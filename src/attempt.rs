//! The fallback state machine of one request: which candidate to try next, when to give up, and
//! the state changes and events each step decides. Pure: the component performs the I/O and the
//! returned key-value operations, at the moment each is decided.

use crate::event::Event;
use crate::kv::{keys, KvOp};
use crate::route::{Candidate, Plan};
use crate::stats;
use crate::upstream::Failure;
use crate::wire::openai::Usage;
use crate::ApiError;

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Send to this candidate with this key (a fingerprint); perform `ops` (its attempt
    /// counter) first, log `event`.
    Try {
        attempt: u32,
        candidate: Candidate,
        key: String,
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

/// One request's walk through its plan: each candidate with its keys in order. A failure that
/// belongs to the key (429, 401/403) moves to the candidate's next key; any other retryable
/// failure moves to the next candidate. Each key is tried at most once per request.
#[derive(Debug, Clone)]
pub struct Attempts {
    plan: Plan,
    /// The next (candidate, key) position to try.
    pos: (usize, usize),
    /// The position of the attempt in flight.
    current: (usize, usize),
    attempt: u32,
    /// Set when the walk must stop: the error the client gets.
    stop: Option<ApiError>,
}

impl Attempts {
    pub fn new(plan: Plan) -> Self {
        Self {
            plan,
            pos: (0, 0),
            current: (0, 0),
            attempt: 0,
            stop: None,
        }
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
        let Some((candidate, key)) = self.at(self.pos) else {
            return Next::GiveUp(ApiError::internal("no candidate left to try"));
        };
        self.current = self.pos;
        self.pos.1 += 1;
        self.attempt += 1;
        Next::Try {
            attempt: self.attempt,
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

    /// The candidate and key at `pos`, moving on to the next candidate past a last key.
    fn at(&mut self, pos: (usize, usize)) -> Option<(Candidate, String)> {
        let (mut ci, mut ki) = pos;
        loop {
            let c = self.plan.candidates.get(ci)?;
            if let Some(k) = c.keys.get(ki) {
                self.pos = (ci, ki);
                return Some((c.clone(), k.clone()));
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
        if let Some(cd) = &failure.cooldown {
            let ledger = if failure.key_refused() {
                None
            } else {
                candidate.ledger.as_deref()
            };
            ops.push(cd.op(keys::cooldown(&candidate.provider, key, ledger)));
        }
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
        if failure.key_refused() {
            events.push(Event::KeySetAside {
                provider: candidate.provider.clone(),
                key: key.to_owned(),
                status: upstream_status.unwrap_or(0),
                until_ms: failure.cooldown.map_or(0, |c| c.until_ms),
            });
        }
        // A failure of the key (rate limit, refused key) leaves the candidate's other keys to
        // try; any other failure is the provider's or the model's: skip to the next candidate.
        let key_failure = failure.key_refused() || failure.cooldown.is_some();
        let (ci, ki) = self.current;
        let next_pos = if key_failure {
            (ci, ki + 1)
        } else {
            (ci + 1, 0)
        };
        let next = if failure.retryable {
            self.at(next_pos)
        } else {
            None
        };
        match next {
            Some((to, to_key)) => events.push(Event::Fallback {
                from: format!("{}/{}", candidate.provider, candidate.model),
                to: format!("{}/{}", to.provider, to.model),
                reason: if to.provider == candidate.provider && to.model == candidate.model {
                    format!("HTTP {}; next key {to_key}", failure.error.status)
                } else {
                    format!("HTTP {}", failure.error.status)
                },
            }),
            None => self.stop = Some(failure.error),
        }
        Decided { ops, events }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::config_of;
    use crate::config::ApiKey;
    use crate::cooldown::Cooldown;
    use crate::kv::{apply, decode_counter, Kv, MemKv};
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
        mut script: Vec<Script>,
        now: u64,
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
        let cooling = kv.get_many(&plan.cooldown_keys()).unwrap();
        let plan = match plan.without_cooling(&cooling, now) {
            Ok(p) => p,
            Err(e) => {
                apply(kv, &stats::refused()).unwrap();
                return (Err(e), vec![]);
            }
        };
        let mut events = vec![];
        let mut attempts = Attempts::new(plan);
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
        let (who, _) = drive(
            &kv,
            "auto",
            &["groq", "mistral", "openai"],
            vec![
                Script::Transport(Transport::Timeout),
                Script::Status(503, None),
                Script::Answer(USAGE),
            ],
            0,
        );
        assert_eq!(who.unwrap(), "openai");
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
                Script::Transport(Transport::Timeout),
            ],
            0,
        );
        assert_eq!(who.unwrap_err().status, 504);
        let failed = events
            .iter()
            .filter(|e| matches!(e, Event::AttemptFailed { .. }))
            .count();
        assert_eq!(failed, 2);
        assert_eq!(counter(&kv, "stats:v1:groq:errors"), 1);
        assert_eq!(counter(&kv, "stats:v1:mistral:errors"), 1);
    }

    #[test]
    fn zero_usage_writes_nothing_more() {
        let c = Candidate {
            provider: "groq".into(),
            model: "m".into(),
            ledger: None,
            keys: vec![],
            reason: String::new(),
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
        // A 5xx is the provider's, not the key's: the other key is not tried.
        let (who, events) = drive(
            &kv,
            "auto",
            &["groq=ka,kb", "mistral"],
            vec![Script::Status(503, None), Script::Answer(USAGE)],
            0,
        );
        assert_eq!(who.unwrap(), "mistral");
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::AttemptStart { .. }))
                .count(),
            2
        );
    }
}
