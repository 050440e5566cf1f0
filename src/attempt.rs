//! The fallback state machine of one request: which candidate to try next, when to give up, and
//! the state changes and events each step decides. Pure: the component performs the I/O and the
//! returned key-value operations, at the moment each is decided.

use crate::event::Event;
use crate::kv::KvOp;
use crate::route::{Candidate, Plan};
use crate::stats;
use crate::upstream::Failure;
use crate::wire::openai::Usage;
use crate::ApiError;

/// What to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Send to this candidate; perform `ops` (its attempt counter) first, log `event`.
    Try {
        attempt: u32,
        candidate: Candidate,
        ops: Vec<KvOp>,
        event: Event,
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

/// One request's walk through its plan.
#[derive(Debug, Clone)]
pub struct Attempts {
    plan: Plan,
    next: usize,
    attempt: u32,
    /// Set when the walk must stop: the error the client gets.
    stop: Option<ApiError>,
}

impl Attempts {
    pub fn new(plan: Plan) -> Self {
        Self {
            plan,
            next: 0,
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
            self.next = self.plan.candidates.len();
            return Next::GiveUp(e);
        }
        let Some(candidate) = self.plan.candidates.get(self.next).cloned() else {
            return Next::GiveUp(ApiError::internal("no candidate left to try"));
        };
        self.next += 1;
        self.attempt += 1;
        Next::Try {
            attempt: self.attempt,
            ops: vec![stats::attempt_started(&candidate.provider)],
            event: Event::AttemptStart {
                attempt: self.attempt,
                provider: candidate.provider.clone(),
                model: candidate.model.clone(),
            },
            candidate,
        }
    }

    /// The current attempt failed before any byte reached the client (`upstream_status`: the
    /// upstream's status when it answered). Decides whether another candidate is tried.
    pub fn failed(
        &mut self,
        candidate: &Candidate,
        failure: Failure,
        upstream_status: Option<u16>,
        ms: u64,
    ) -> Decided {
        let mut ops = vec![stats::attempt_failed(&candidate.provider)];
        if let Some(cd) = &failure.cooldown {
            ops.insert(0, cd.op(&candidate.provider));
        }
        let mut events = vec![Event::AttemptFailed {
            attempt: self.attempt,
            provider: candidate.provider.clone(),
            model: candidate.model.clone(),
            upstream_status,
            status: failure.error.status,
            reason: failure.error.message.clone(),
            retryable: failure.retryable,
            cooldown_until_ms: failure.cooldown.map(|c| c.until_ms),
            ms,
        }];
        let more = self.next < self.plan.candidates.len();
        if failure.retryable && more {
            let to = &self.plan.candidates[self.next];
            events.push(Event::Fallback {
                from: format!("{}/{}", candidate.provider, candidate.model),
                to: format!("{}/{}", to.provider, to.model),
                reason: format!("HTTP {}", failure.error.status),
            });
        } else {
            self.stop = Some(failure.error);
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
        let pairs: Vec<(String, String)> = providers
            .iter()
            .map(|p| (format!("{p}_api_key"), format!("key-{p}")))
            .collect();
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(a, b)| (&**a, &**b)).collect();
        let config = config_of(&pairs).unwrap();
        let plan = route::plan(&config, model).unwrap();
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
                    ops,
                    event,
                    ..
                } => {
                    ops.iter().for_each(|op| apply(kv, op).unwrap());
                    events.push(event);
                    let key = format!("key-{}", candidate.provider);
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
                    let d = attempts.failed(&candidate, failure, status, 5);
                    d.ops.iter().for_each(|op| apply(kv, op).unwrap());
                    events.extend(d.events);
                }
            }
        }
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
        let cd = Cooldown::decode(&kv.get("cooldown:v1:groq").unwrap().unwrap()).unwrap();
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
        let plan = route::plan(&config_of(&[("groq_api_key", "k")]).unwrap(), "auto").unwrap();
        let mut a = Attempts::new(plan);
        let Next::Try { candidate, .. } = a.next_step() else {
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
        for op in a.failed(&candidate, f, Some(429), 1).ops {
            apply(&kv, &op).unwrap();
        }
        let cd = Cooldown::decode(&kv.get("cooldown:v1:groq").unwrap().unwrap()).unwrap();
        assert_eq!(cd.until_ms, 60_000);
    }

    #[test]
    fn every_candidate_cooling_is_refused_locally_and_counted() {
        let kv = MemKv::default();
        kv.set("cooldown:v1:groq", &Cooldown::new(0, 9_000, 429).encode())
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
            kv.get("cooldown:v1:mistral").unwrap().is_none(),
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
            reason: String::new(),
        };
        assert!(Attempts::usage(&c, Usage::default()).is_empty());
        assert_eq!(Attempts::usage(&c, USAGE).len(), 2);
    }
}
