//! The router's per-request work, natively: profile a request, list its candidates and their
//! keys, and decide (score, order, audit) — for 1 KB, 32 KB and 256 KB conversations on `auto`
//! with every catalogued provider configured (the largest pool), nothing learned yet.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use freerelay::catalog::PROVIDERS;
use freerelay::config::Config;
use freerelay::router::{Facts, Router};
use freerelay::wire::openai::ChatRequest;
use serde_json::json;

fn config() -> Config {
    Config::from_vars(|name| {
        let p = name.strip_suffix("_api_key")?;
        (p != "custom" && PROVIDERS.iter().any(|x| x.id == p)).then(|| format!("k-{p}"))
    })
    .unwrap()
}

/// A conversation of about `bytes`: a system prompt, turns of prose and code, a pasted document.
fn conversation(bytes: usize) -> ChatRequest {
    let prose = "The quarterly report shows revenue up four percent while costs fell slightly; \
                 the board asked for a breakdown by region and a forecast for next year. ";
    let code = "```rust\nfn total(xs: &[u64]) -> u64 {\n    xs.iter().sum()\n}\n```\n";
    let mut messages = vec![json!({"role": "system", "content": "You are a careful analyst."})];
    let mut size = 0;
    let mut i = 0;
    while size < bytes {
        let user = format!(
            "Question {i}: {prose}{}",
            if i % 3 == 0 { code } else { "" }
        );
        let answer = format!("Answer {i}: {prose}");
        size += user.len() + answer.len();
        messages.push(json!({"role": "user", "content": user}));
        messages.push(json!({"role": "assistant", "content": answer}));
        i += 1;
    }
    messages.push(json!({"role": "user", "content": "Summarise the figures above in a table."}));
    let body = json!({"model": "auto", "messages": messages, "stream": true});
    ChatRequest::parse(&serde_json::to_vec(&body).unwrap()).unwrap()
}

fn bench(c: &mut Criterion) {
    let config = config();
    let facts = Facts {
        mode: "auto".into(),
        tenant: "tbench".into(),
        user: None,
        conversation: Some("chat-1".into()),
        rotation: 7,
        now_ms: 1_800_000_000_000,
    };
    let mut g = c.benchmark_group("route");
    for kb in [1usize, 32, 256] {
        let request = conversation(kb * 1024);
        g.throughput(Throughput::Bytes((kb * 1024) as u64));
        g.bench_with_input(
            BenchmarkId::new("decide", format!("{kb}KB")),
            &request,
            |b, r| {
                b.iter(|| {
                    let router = Router::new(&config, black_box(r), &facts).unwrap();
                    let values = vec![None; router.keys().len()];
                    black_box(router.decide(&values).unwrap())
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
