//! The per-request work of the core, measured natively: parse + validate a chat request, plan
//! its route and build the upstream body. The gateway does exactly this once per request.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use freerelay::config::Config;
use freerelay::route;
use freerelay::wire::openai::ChatRequest;
use freerelay::wire::sse::SseScanner;

fn config() -> Config {
    Config::from_vars(|k| match k {
        "groq_api_key" | "mistral_api_key" => Some("k".into()),
        "client_keys" => Some(freerelay::auth::digest_hex("fr-bench")),
        _ => None,
    })
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let cfg = config();
    let body = br#"{"model":"auto","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello in five words."}],"temperature":0.2,"stream":false}"#;
    c.bench_function("parse+plan+upstream_body", |b| {
        b.iter(|| {
            let req = ChatRequest::parse(black_box(body)).unwrap();
            let plan = route::plan(&cfg, &req.model).unwrap();
            black_box(req.upstream_body(&plan.candidates[0].model))
        })
    });
    c.bench_function("config_from_vars", |b| b.iter(|| black_box(config())));
    let stream: Vec<u8> = (0..50)
        .map(|i| format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"w{i} \"}}}}],\"usage\":null}}\n\n"))
        .chain(std::iter::once("data: [DONE]\n\n".to_owned()))
        .collect::<String>()
        .into_bytes();
    c.bench_function("sse_scan_50_chunks", |b| {
        b.iter(|| {
            let mut s = SseScanner::default();
            s.feed(black_box(&stream));
            black_box(s.done)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
