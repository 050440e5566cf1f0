//! The task profiler over realistic conversations of 1 KB, 32 KB and 256 KB (prose, code
//! fences, a stack trace, a pasted document), natively. The request is parsed once outside the
//! loop: what is measured is `Profile::of` alone, with throughput in body bytes.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use freerelay::profile::{Economic, Profile};
use freerelay::wire::openai::ChatRequest;
use serde_json::{json, Value};

const PROSE: &str =
    "The migration plan moves the billing service off the shared database in three steps. \
First we copy the invoices table to its own schema and keep both in sync with triggers; then we \
switch reads, watch the error budget for a week, and only then switch writes. Rollback is a flag. ";

const CODE: &str = "```rust\npub fn reconcile(invoices: &[Invoice], payments: &[Payment]) -> Vec<Mismatch> {\n    \
let mut by_id: HashMap<u64, &Payment> = payments.iter().map(|p| (p.invoice_id, p)).collect();\n    \
invoices\n        .iter()\n        .filter_map(|i| match by_id.remove(&i.id) {\n            \
Some(p) if p.amount == i.total => None,\n            Some(p) => Some(Mismatch::Amount(i.id, p.amount)),\n            \
None => Some(Mismatch::Missing(i.id)),\n        })\n        .collect()\n}\n```\n";

const TRACE: &str = "Traceback (most recent call last):\n  File \"billing/sync.py\", line 88, in run\n    \
apply(batch)\n  File \"billing/sync.py\", line 41, in apply\n    row = rows[key]\nKeyError: 'inv_2291'\n";

/// A conversation of about `size` bytes: a system prompt, turns of prose and code, a stack
/// trace, and (from 32 KB) a pasted document in the last user turn.
fn conversation(size: usize) -> ChatRequest {
    let mut messages: Vec<Value> = vec![
        json!({"role": "system", "content": "You are a careful senior engineer. Answer concisely; show code when it helps."}),
    ];
    let mut total = 200;
    let mut turn = 0;
    let document = size >= 32 * 1024;
    let budget = if document { size / 2 } else { size };
    while total < budget {
        let user = match turn % 3 {
            0 => format!("{PROSE}Why does the sync job fail?\n{TRACE}"),
            1 => format!(
                "Here is the reconcile function:\n{CODE}Can we make it handle partial payments?"
            ),
            _ => format!("{PROSE}What are the trade-offs of doing it with triggers?"),
        };
        let answer = format!("{PROSE}{CODE}");
        total += user.len() + answer.len() + 60;
        messages.push(json!({"role": "user", "content": user}));
        messages.push(json!({"role": "assistant", "content": answer}));
        turn += 1;
    }
    let mut last = String::from("Here is the design document we agreed on last quarter:\n\n");
    while document && total + last.len() < size {
        last.push_str(PROSE);
        last.push('\n');
    }
    last.push_str("\nSummarise what changed and list the risks.");
    messages.push(json!({"role": "user", "content": last}));
    let body = json!({"model": "auto", "stream": true, "messages": messages});
    ChatRequest::parse(&serde_json::to_vec(&body).unwrap()).unwrap()
}

fn body_len(r: &ChatRequest) -> usize {
    serde_json::to_vec(r.body()).unwrap().len()
}

fn profile(c: &mut Criterion) {
    let mut g = c.benchmark_group("profile");
    for (name, size) in [("1KB", 1024), ("32KB", 32 * 1024), ("256KB", 256 * 1024)] {
        let r = conversation(size);
        g.throughput(Throughput::Bytes(body_len(&r) as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &r, |b, r| {
            b.iter(|| Profile::of(black_box(r), Economic::default()))
        });
    }
    g.finish();
}

criterion_group!(benches, profile);
criterion_main!(benches);
