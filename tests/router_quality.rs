//! The labelled set (`tests/fixtures/profile/labelled.jsonl`) through the whole router, as a
//! deployment with every catalogued provider configured would route it on `auto` with nothing
//! learned yet: which tier the first candidate of the plan is on, against the tier a careful
//! engineer chose. Prints a report per split and fails on regression.
//!
//! Cost model (USD): input tokens = body bytes / 4, output = `max_tokens` or 400 (30 for a
//! background chore); "routed" prices each request at the catalogue price of the model the
//! router puts first on `auto` (0 on a free tier). Against two baselines: "always paid" sends
//! every request to OpenAI `gpt-4.1` (the reference of `profile_quality.rs`: one good paid
//! model for everything), which the test holds to ≥ 70 % saved; and, reported, "paid mode":
//! each request at the model the same router puts first in `paid` mode. Cost saved =
//! 1 − routed / baseline. Under-serving: the share of paid-labelled requests whose first
//! candidate is free.

use freerelay::catalog::{Tier, PROVIDERS};
use freerelay::config::Config;
use freerelay::router::{self, Facts};
use freerelay::wire::openai::ChatRequest;
use serde_json::Value;

fn config() -> Config {
    Config::from_vars(|name| {
        let provider = name.strip_suffix("_api_key")?;
        (PROVIDERS.iter().any(|p| p.id == provider) && provider != "custom")
            .then(|| format!("key-{provider}"))
    })
    .expect("a configuration with every provider")
}

#[derive(Default)]
struct Tally {
    n: u32,
    right: u32,
    paid: u32,
    under: u32,
    free: u32,
    over: u32,
    always_paid_usd: f64,
    paid_mode_usd: f64,
    routed_usd: f64,
}

impl Tally {
    fn report(&self, name: &str) -> String {
        format!(
            "{name:<8} n={:<4} tier accuracy {:5.1}%  under-serving {}/{} ({:.1}%)  \
             over-serving {}/{} ({:.1}%)  cost saved {:.1}% (vs paid mode {:.1}%)",
            self.n,
            pct(self.right, self.n),
            self.under,
            self.paid,
            pct(self.under, self.paid),
            self.over,
            self.free,
            pct(self.over, self.free),
            100.0 * (1.0 - self.routed_usd / self.always_paid_usd.max(1e-12)),
            100.0 * (1.0 - self.routed_usd / self.paid_mode_usd.max(1e-12)),
        )
    }
}

fn pct(a: u32, b: u32) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * f64::from(a) / f64::from(b)
    }
}

#[test]
fn the_router_keeps_paid_worthy_work_paid_and_saves_the_rest() {
    let config = config();
    let reference = freerelay::catalog::provider("openai")
        .and_then(|p| p.models.iter().find(|m| m.id == "gpt-4.1"))
        .and_then(|m| m.info.price)
        .expect("gpt-4.1's price");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/profile/labelled.jsonl"
    ))
    .unwrap();
    let (mut dev, mut holdout, mut all) = (Tally::default(), Tally::default(), Tally::default());
    let mut misses = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap();
        let mut body = v["request"].clone();
        body["model"] = Value::from("auto");
        let bytes = serde_json::to_vec(&body).unwrap();
        let request = ChatRequest::parse(&bytes).unwrap();
        let facts = |mode: &str| Facts {
            mode: mode.into(),
            tenant: "tquality".into(),
            user: None,
            conversation: None,
            rotation: 0,
            now_ms: 1_800_000_000_000,
        };
        let d = router::explain(&config, &request, &facts("auto"), None)
            .unwrap_or_else(|e| panic!("{}: {}", v["id"], e.message));
        let paid = router::explain(&config, &request, &facts("paid"), None)
            .unwrap_or_else(|e| panic!("{} (paid): {}", v["id"], e.message));
        let paid_first = &paid.plan.candidates[0];
        let first = &d.plan.candidates[0];
        let conf = config.provider(&first.provider).unwrap();
        let routed_tier = conf.tier;
        let labelled = match v["tier"].as_str() {
            Some("paid") => Tier::Paid,
            _ => Tier::Free,
        };
        let background = v["family"].as_str() == Some("background");
        let input = bytes.len() as f64 / 4.0;
        let output = body
            .get("max_tokens")
            .or_else(|| body.get("max_completion_tokens"))
            .and_then(Value::as_f64)
            .unwrap_or(if background { 30.0 } else { 400.0 });
        let cost = |input_per_m: f64, output_per_m: f64| {
            (input * input_per_m + output * output_per_m) / 1e6
        };
        let price = |provider: &str, model: &str| {
            config
                .provider(provider)
                .and_then(|c| c.price(model))
                .map_or(0.0, |p| cost(p.input, p.output))
        };
        let always = cost(reference.input, reference.output);
        let paid_mode = price(&paid_first.provider, &paid_first.model);
        let routed = price(&first.provider, &first.model);
        let split = if v["split"].as_str() == Some("dev") {
            &mut dev
        } else {
            &mut holdout
        };
        for t in [split, &mut all] {
            t.n += 1;
            t.right += u32::from(routed_tier == labelled);
            t.always_paid_usd += always;
            t.paid_mode_usd += paid_mode;
            t.routed_usd += routed;
            match labelled {
                Tier::Paid => {
                    t.paid += 1;
                    t.under += u32::from(routed_tier == Tier::Free);
                }
                Tier::Free => {
                    t.free += 1;
                    t.over += u32::from(routed_tier == Tier::Paid);
                }
            }
        }
        if routed_tier != labelled {
            misses.push(format!(
                "{} labelled {} → {}/{}",
                v["id"].as_str().unwrap_or(""),
                labelled.as_str(),
                first.provider,
                first.model
            ));
        }
    }
    println!("{}", dev.report("dev"));
    println!("{}", holdout.report("holdout"));
    println!("{}", all.report("all"));
    for m in &misses {
        println!("  miss: {m}");
    }
    assert!(all.n >= 300, "the labelled set has {} requests", all.n);
    assert!(
        pct(all.under, all.paid) <= 3.0,
        "under-serving above 3%: {}",
        all.report("all")
    );
    let saved = 1.0 - all.routed_usd / all.always_paid_usd;
    assert!(saved >= 0.70, "cost saved below 70%: {}", all.report("all"));
    assert!(
        pct(all.right, all.n) >= 97.0,
        "tier accuracy regressed: {}",
        all.report("all")
    );
}
