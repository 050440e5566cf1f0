//! The context optimizer's cost, measured natively: `fit` of 32 KB and 256 KB conversations
//! (a system prompt, then alternating user and assistant turns, some with code) into an 8K
//! window with 1K reserved for the answer, and `tokens` of the 256 KB one.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use freerelay::context::{self, Fit};
use freerelay::wire::openai::ChatRequest;
use serde_json::json;

/// English-like text of about `bytes` bytes drawn from a small vocabulary by a fixed walk.
fn text(bytes: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the", "parser", "returns", "token", "window", "provider", "request", "cache", "between",
        "quickly", "answer", "stream", "budget", "limit", "minute", "tenant", "policy", "retry",
        "gateway", "model", "message", "system", "error", "function", "value", "string", "field",
        "schema", "table", "query", "index", "config", "deploy", "server", "client", "header",
    ];
    let mut s = String::with_capacity(bytes + 16);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while s.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
        s.push_str(match x >> 61 {
            0 => ". ",
            1 => ",\n",
            _ => " ",
        });
    }
    s
}

/// About `bytes` bytes: a 1 KB system prompt and 2 KB turns, every fifth with a code block.
fn conversation(bytes: usize) -> ChatRequest {
    let mut messages = vec![json!({"role": "system", "content": text(1024, 1)})];
    let mut i = 0;
    while messages.len() * 2048 < bytes {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        let mut t = text(2048, i + 2);
        if i % 5 == 3 {
            t.push_str(
                "\n```rust\nfn parse(input: &str) -> Result<Token, Error> { todo!() }\n```\n",
            );
        }
        messages.push(json!({"role": role, "content": t}));
        i += 1;
    }
    messages.push(json!({"role": "user", "content": "Why does the parser return an error for an empty schema field? Fix the function."}));
    let body = json!({"model": "auto", "max_tokens": 1024, "messages": messages});
    ChatRequest::parse(&serde_json::to_vec(&body).unwrap()).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("context_fit_8K");
    for kb in [32usize, 256] {
        let r = conversation(kb * 1024);
        assert!(matches!(context::fit(&r, 8192, 1024), Fit::Trimmed(_)));
        g.throughput(Throughput::Bytes((kb * 1024) as u64));
        g.bench_function(format!("{kb}KB"), |b| {
            b.iter(|| black_box(context::fit(black_box(&r), 8192, 1024)))
        });
    }
    let r = conversation(256 * 1024);
    g.bench_function("tokens_256KB", |b| {
        b.iter(|| black_box(context::tokens(black_box(&r))))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
