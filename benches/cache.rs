//! The response cache's per-request costs, measured natively: the semantic signature of texts of
//! 1, 8, 32 and 256 KB (throughput reported, so per-KB cost = 1 / throughput), the semantic
//! sketch of a whole 32 KB conversation, the exact key of a 32 KB request, and full lookups (key,
//! exact lookup, then semantic lookup) that hit or miss on `MemKv`, and a store.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use freerelay::cache::{self, Answer, Key, Policy, Scope};
use freerelay::kv::MemKv;
use freerelay::wire::openai::{ChatRequest, Usage};
use serde_json::json;

const NOW: u64 = 1_750_000_000_000;

/// English-like text of about `bytes` bytes: words drawn from a small vocabulary by a fixed
/// pseudo-random walk, with punctuation and the odd number.
fn text(bytes: usize, seed: u64) -> String {
    const WORDS: &[&str] = &[
        "the",
        "model",
        "answer",
        "request",
        "cache",
        "quickly",
        "between",
        "provider",
        "token",
        "window",
        "limit",
        "free",
        "tier",
        "gateway",
        "stream",
        "Response",
        "choice",
        "message",
        "system",
        "user",
        "assistant",
        "reads",
        "writes",
        "store",
        "under",
        "every",
        "minute",
        "daily",
        "quota",
        "budget",
        "breaker",
        "open",
        "closed",
        "half",
        "retry",
        "after",
        "seconds",
        "tenant",
        "policy",
        "exact",
        "semantic",
        "similar",
        "threshold",
        "band",
        "row",
        "signature",
        "shingle",
        "word",
        "lower",
        "case",
        "punctuation",
        "split",
        "number",
    ];
    let mut s = String::with_capacity(bytes + 16);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while s.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
        match x >> 60 {
            0 => s.push_str(", "),
            1 => s.push_str(". "),
            2 => s.push_str(&format!(" {} ", x % 1000)),
            _ => s.push(' '),
        }
    }
    s
}

/// A conversation of about `bytes` bytes: a system prompt and alternating turns.
fn conversation(bytes: usize, seed: u64) -> ChatRequest {
    let turns = 6;
    let mut messages = vec![json!({"role": "system", "content": text(bytes / 2, seed)})];
    for i in 0..turns {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages
            .push(json!({"role": role, "content": text(bytes / 2 / turns, seed + i as u64 + 1)}));
    }
    let body = json!({"model": "auto", "temperature": 0, "messages": messages});
    ChatRequest::parse(&serde_json::to_vec(&body).unwrap()).unwrap()
}

fn answer() -> Answer {
    Answer::text(
        "groq",
        "llama-3.1-8b-instant",
        &text(2048, 99),
        "stop",
        Usage {
            prompt_tokens: 500,
            completion_tokens: 400,
        },
        1_700_000_000,
    )
}

/// Key, exact lookup, then semantic lookup on a miss: what the gateway does per request.
fn lookup(kv: &MemKv, req: &ChatRequest, policy: &Policy) -> Option<cache::Hit> {
    let key = Key::of(req, Scope::new("tenant", "auto"));
    match cache::lookup_exact(kv, &key, NOW).unwrap() {
        Some(h) => Some(h),
        None => cache::lookup_semantic(kv, &key, policy, NOW).unwrap(),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("signature");
    for kb in [1usize, 8, 32, 256] {
        let t = text(kb * 1024, 1);
        g.throughput(Throughput::Bytes(t.len() as u64));
        g.bench_function(format!("{kb}KB"), |b| {
            b.iter(|| black_box(cache::signature(black_box(&t))))
        });
    }
    g.finish();

    let scope = Scope::new("tenant", "auto");
    let r32 = conversation(32 * 1024, 2);
    let mut g = c.benchmark_group("key_32KB_conversation");
    g.throughput(Throughput::Bytes(32 * 1024));
    g.bench_function("exact", |b| {
        b.iter(|| black_box(Key::of(black_box(&r32), scope.clone())))
    });
    g.bench_function("semantic_sketch", |b| {
        b.iter_batched(
            || Key::of(&r32, scope.clone()),
            |k| {
                black_box(k.semantic().buckets());
                k
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();

    // A store of 256 entries of 4 KB conversations, then lookups.
    let policy = Policy::default();
    let kv = MemKv::default();
    let stored: Vec<ChatRequest> = (0..256).map(|i| conversation(4096, 1000 + i)).collect();
    for r in &stored {
        cache::store(&kv, &Key::of(r, scope.clone()), &answer(), &policy, NOW)
            .unwrap()
            .unwrap();
    }
    let exact = &stored[17];
    // The same conversation with one word of the system prompt changed (a semantic hit).
    let mut near_body = serde_json::to_value(exact.body()).unwrap();
    let system = near_body["messages"][0]["content"].as_str().unwrap();
    let changed = system.replacen("model", "modem", 1);
    assert_ne!(changed, system);
    near_body["messages"][0]["content"] = changed.into();
    let near = ChatRequest::parse(&serde_json::to_vec(&near_body).unwrap()).unwrap();
    let miss = conversation(4096, 5);
    assert_eq!(
        lookup(&kv, exact, &policy).map(|h| h.kind),
        Some(cache::HitKind::Exact)
    );
    assert_eq!(
        lookup(&kv, &near, &policy).map(|h| h.kind),
        Some(cache::HitKind::Semantic)
    );
    assert!(lookup(&kv, &miss, &policy).is_none());
    let mut g = c.benchmark_group("lookup_4KB_conversation");
    g.bench_function("exact_hit", |b| {
        b.iter(|| black_box(lookup(&kv, exact, &policy)))
    });
    g.bench_function("semantic_hit", |b| {
        b.iter(|| black_box(lookup(&kv, &near, &policy)))
    });
    g.bench_function("miss", |b| {
        b.iter(|| black_box(lookup(&kv, &miss, &policy)))
    });
    g.bench_function("store", |b| {
        let kv = MemKv::default();
        b.iter(|| {
            let key = Key::of(&miss, scope.clone());
            black_box(cache::store(&kv, &key, &answer(), &policy, NOW).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
