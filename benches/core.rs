//! The per-request work of the core, measured natively: parse + validate a chat request, plan
//! its route and build the upstream request; translate a JSON answer and a stream. The gateway
//! does exactly this once per request.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use freerelay::adapter;
use freerelay::catalog::Wire;
use freerelay::config::Config;
use freerelay::route;
use freerelay::wire::openai::ChatRequest;

fn config() -> Config {
    Config::from_vars(|k| match k {
        "groq_api_key" | "mistral_api_key" => Some("k".into()),
        _ => None,
    })
    .unwrap()
}

/// An OpenAI stream of `n` content chunks, a finish chunk, the usage chunk and `[DONE]`.
fn stream(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| format!("data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{i} \"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"))
        .chain([
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n".to_owned(),
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":200}}\n\n".to_owned(),
            "data: [DONE]\n\n".to_owned(),
        ])
        .collect::<String>()
        .into_bytes()
}

/// The identity of a translated answer, as the gateway builds it per attempt.
fn ctx() -> adapter::ReplyCtx {
    adapter::ReplyCtx {
        id: "chatcmpl-bench".into(),
        created: 1_700_000_000,
        model: "m".into(),
        client_usage: false,
        price: None,
        continuation: false,
        collect_text: false,
    }
}

/// An Anthropic Messages stream of `n` text deltas, as the API sends it.
fn anthropic_stream(n: usize) -> Vec<u8> {
    let mut s = String::from("event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-haiku-4-5\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n");
    for i in 0..n {
        s.push_str(&format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"w{i} \"}}}}\n\n"));
    }
    s.push_str("event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":200}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    s.into_bytes()
}

/// A Gemini `streamGenerateContent?alt=sse` stream of `n` text chunks, the last one finishing.
fn gemini_stream(n: usize) -> Vec<u8> {
    let mut s = String::new();
    for i in 0..n {
        let finish = if i + 1 == n {
            ",\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":9,\"candidatesTokenCount\":200,\"totalTokenCount\":209}"
        } else {
            "}]"
        };
        s.push_str(&format!("data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"w{i} \"}}],\"role\":\"model\"}},\"index\":0{finish},\"modelVersion\":\"gemini-2.5-flash\",\"responseId\":\"r1\"}}\r\n\r\n"));
    }
    s.into_bytes()
}

fn bench(c: &mut Criterion) {
    let cfg = config();
    let openai = adapter::for_wire(Wire::OpenAi);
    let body = br#"{"model":"auto","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say hello in five words."}],"temperature":0.2,"stream":false}"#;
    c.bench_function("parse+plan+upstream_request", |b| {
        b.iter(|| {
            let req = ChatRequest::parse(black_box(body)).unwrap();
            let plan = route::plan(&cfg, &req.model, 7).unwrap();
            let cand = &plan.candidates[0];
            let configured = cfg.provider(&cand.provider).unwrap();
            let target = configured.target(&cand.model);
            let mut up = openai.request(&target, &req).unwrap();
            let key = configured.key(&cand.keys[0]).unwrap();
            adapter::authorize(&mut up, target.provider.auth, key.secret());
            black_box(up)
        })
    });
    c.bench_function("config_from_vars", |b| b.iter(|| black_box(config())));
    let answer = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, friend of mine."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;
    c.bench_function("translate_json_answer", |b| {
        b.iter(|| black_box(openai.answer(black_box(answer), &ctx()).unwrap()))
    });
    let formats: [(&str, Wire, Vec<u8>); 3] = [
        ("openai", Wire::OpenAi, stream(200)),
        ("anthropic", Wire::Anthropic, anthropic_stream(200)),
        ("gemini", Wire::Gemini, gemini_stream(200)),
    ];
    for (name, wire, s) in &formats {
        let adapter = adapter::for_wire(*wire);
        let pieces: Vec<&[u8]> = s.split_inclusive(|&b| b == b'\n').collect();
        c.bench_function(&format!("stream_200_chunks/{name}"), |b| {
            b.iter(|| {
                let mut t = adapter.stream(ctx());
                let mut out = Vec::with_capacity(s.len() * 2);
                for p in &pieces {
                    t.feed(black_box(p), &mut out);
                }
                let end = t.end(None, &mut out);
                assert!(
                    matches!(end, adapter::StreamEnd::Complete),
                    "{name}: {end:?}"
                );
                black_box(out.len())
            })
        });
    }
    let req = ChatRequest::parse(body).unwrap();
    for (name, provider, model) in [
        ("openai", "groq", "llama-3.1-8b-instant"),
        ("anthropic", "anthropic", "claude-haiku-4-5"),
        ("gemini", "gemini", "gemini-2.5-flash"),
    ] {
        let all = Config::from_vars(|k| k.ends_with("_api_key").then(|| "k".into())).unwrap();
        let configured = all.provider(provider).unwrap().clone();
        let adapter = adapter::for_wire(configured.provider.wire);
        c.bench_function(&format!("upstream_request/{name}"), |b| {
            b.iter(|| black_box(adapter.request(&configured.target(model), black_box(&req))))
        });
    }
    {
        let n = 50usize;
        let s = stream(n);
        // Fed as the upstream sends it: one network read per event.
        let pieces: Vec<&[u8]> = s.split_inclusive(|&b| b == b'\n').collect();
        c.bench_function(&format!("translate_stream_{n}_chunks"), |b| {
            b.iter(|| {
                let mut t = openai.stream(ctx());
                let mut out = Vec::with_capacity(s.len());
                for p in &pieces {
                    t.feed(black_box(p), &mut out);
                }
                let end = t.end(None, &mut out);
                black_box((out.len(), end))
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
