//! The task profiler against its labelled set (`tests/fixtures/profile/labelled.jsonl`):
//! realistic requests, each labelled by hand with the tier that serves it well and its family.
//! Prints a report for the `dev` split (the features were written against it), the `holdout`
//! split (checked after) and all, and fails on regression.
//!
//! Cost model (USD, the same for every split):
//! - input tokens = request body bytes / 4 (as `quota::estimate_prompt_tokens`);
//! - output tokens = the request's `max_tokens` (or `max_completion_tokens`), else 400, and 30
//!   for a request labelled `background` without one (titles, tags: short answers);
//! - always-paid cost = every request at the reference paid price, OpenAI `gpt-4.1` from the
//!   catalogue (input and output per million tokens);
//! - routed cost = the same price for requests the profiler sends to `paid`, 0 for `free`.
//!
//! "Cost saved" is 1 − routed / always-paid. "Under-serving" is the share of paid-labelled
//! requests profiled `free` (a weak model on a hard task), "over-serving" the share of
//! free-labelled requests profiled `paid` (money spent for nothing).

use freerelay::catalog::Tier;
use freerelay::profile::{Economic, Family, Profile};
use freerelay::wire::openai::ChatRequest;
use serde_json::Value;

struct Case {
    id: String,
    split: String,
    tier: Tier,
    family: Family,
    body: Vec<u8>,
    output_tokens: f64,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/profile/labelled.jsonl"
    ))
    .expect("the labelled set");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("a JSON line");
            let s = |k: &str| {
                v[k].as_str()
                    .unwrap_or_else(|| panic!("{k} in {line:.80}"))
                    .to_owned()
            };
            let family =
                Family::parse(&s("family")).unwrap_or_else(|| panic!("family of {}", s("id")));
            let tier = match s("tier").as_str() {
                "free" => Tier::Free,
                "paid" => Tier::Paid,
                t => panic!("tier {t}"),
            };
            let request = &v["request"];
            let max = request
                .get("max_tokens")
                .or_else(|| request.get("max_completion_tokens"))
                .and_then(Value::as_f64);
            let output_tokens = max.unwrap_or(if family == Family::Background {
                30.0
            } else {
                400.0
            });
            Case {
                id: s("id"),
                split: s("split"),
                tier,
                family,
                body: serde_json::to_vec(request).unwrap(),
                output_tokens,
            }
        })
        .collect()
}

#[derive(Default, Debug)]
struct Report {
    n: usize,
    tier_ok: usize,
    family_ok: usize,
    paid: usize,
    under: usize,
    free: usize,
    over: usize,
    always_paid: f64,
    routed: f64,
}

impl Report {
    fn pct(a: usize, b: usize) -> f64 {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    }
    fn tier_accuracy(&self) -> f64 {
        Self::pct(self.tier_ok, self.n)
    }
    fn family_accuracy(&self) -> f64 {
        Self::pct(self.family_ok, self.n)
    }
    fn under_serving(&self) -> f64 {
        Self::pct(self.under, self.paid)
    }
    fn over_serving(&self) -> f64 {
        Self::pct(self.over, self.free)
    }
    fn cost_saved(&self) -> f64 {
        100.0 * (1.0 - self.routed / self.always_paid)
    }
    fn line(&self, name: &str) -> String {
        format!(
            "{name:8} n={:3}  tier {:5.1}%  family {:5.1}%  under-serving {:4.1}% ({}/{})  over-serving {:4.1}% ({}/{})  cost saved {:5.1}% (${:.4} of ${:.4})",
            self.n,
            self.tier_accuracy(),
            self.family_accuracy(),
            self.under_serving(),
            self.under,
            self.paid,
            self.over_serving(),
            self.over,
            self.free,
            self.cost_saved(),
            self.routed,
            self.always_paid
        )
    }
}

#[test]
fn profiler_quality_on_the_labelled_set() {
    let price = freerelay::catalog::provider("openai")
        .and_then(|p| p.models.iter().find(|m| m.id == "gpt-4.1"))
        .and_then(|m| m.info.price)
        .expect("the catalogue prices openai/gpt-4.1");
    let cases = cases();
    assert!(
        cases.len() >= 320,
        "the labelled set has {} requests",
        cases.len()
    );
    let (mut dev, mut holdout, mut all) = (Report::default(), Report::default(), Report::default());
    let mut misses = Vec::new();
    for c in &cases {
        let request = ChatRequest::parse(&c.body).unwrap_or_else(|e| panic!("{}: {e:?}", c.id));
        let p = Profile::of(&request, Economic::default());
        let cost =
            (c.body.len() as f64 / 4.0) * price.input / 1e6 + c.output_tokens * price.output / 1e6;
        let predicted = p.tier.value;
        for r in [
            if c.split == "dev" {
                &mut dev
            } else {
                &mut holdout
            },
            &mut all,
        ] {
            r.n += 1;
            r.tier_ok += usize::from(predicted == c.tier);
            r.family_ok += usize::from(p.family.value == c.family);
            r.always_paid += cost;
            if predicted == Tier::Paid {
                r.routed += cost;
            }
            match c.tier {
                Tier::Paid => {
                    r.paid += 1;
                    r.under += usize::from(predicted == Tier::Free);
                }
                Tier::Free => {
                    r.free += 1;
                    r.over += usize::from(predicted == Tier::Paid);
                }
            }
        }
        if predicted != c.tier || p.family.value != c.family {
            misses.push(format!(
                "  {:5} {:28} label {:?}/{:14} got {:?}/{:14} family {:?} tier {:?}",
                c.split,
                c.id,
                c.tier,
                c.family.as_str(),
                predicted,
                p.family.value.as_str(),
                p.family.reasons,
                p.tier.reasons
            ));
        }
    }
    println!(
        "profiler quality (reference paid price: openai/gpt-4.1 ${}/${} per M tokens)",
        price.input, price.output
    );
    println!("{}", dev.line("dev"));
    println!("{}", holdout.line("holdout"));
    println!("{}", all.line("all"));
    println!("misses:\n{}", misses.join("\n"));

    // Under-serving and cost on the whole set (a split has about 30 paid requests: one miss
    // there is 3.4%); accuracy floors a little under what was measured.
    assert!(
        all.under_serving() <= 3.0,
        "under-serving {:.1}% > 3%",
        all.under_serving()
    );
    for (name, r) in [("dev", &dev), ("holdout", &holdout), ("all", &all)] {
        assert!(
            r.cost_saved() >= 70.0,
            "{name}: cost saved {:.1}% < 70%",
            r.cost_saved()
        );
    }
    assert!(
        all.tier_accuracy() >= TIER_FLOOR,
        "tier accuracy {:.1}% < {TIER_FLOOR}%",
        all.tier_accuracy()
    );
    assert!(
        all.family_accuracy() >= FAMILY_FLOOR,
        "family accuracy {:.1}% < {FAMILY_FLOOR}%",
        all.family_accuracy()
    );
    assert!(
        holdout.under_serving() <= 7.0,
        "holdout under-serving {:.1}%",
        holdout.under_serving()
    );
    assert!(
        holdout.tier_accuracy() >= HOLDOUT_TIER_FLOOR,
        "holdout tier accuracy {:.1}%",
        holdout.tier_accuracy()
    );
    assert!(
        holdout.family_accuracy() >= HOLDOUT_FAMILY_FLOOR,
        "holdout family accuracy {:.1}%",
        holdout.family_accuracy()
    );
}

/// Measured: tier 100.0% (all, dev and holdout), family 96.1% (dev 98.4%, holdout 93.7%).
const TIER_FLOOR: f64 = 98.0;
const FAMILY_FLOOR: f64 = 94.0;
const HOLDOUT_TIER_FLOOR: f64 = 97.0;
const HOLDOUT_FAMILY_FLOOR: f64 = 91.5;
