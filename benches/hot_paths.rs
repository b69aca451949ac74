//! Criterion benchmarks of the proxy's hot functions, each against the naive
//! way of doing the same work:
//! - JSON body rewrite (raw top-level members) vs parse into `Value` and
//!   serialize again, for a chat completion and for an embeddings list
//!   (whose kind is told from its first item only);
//! - SSE stream rewrite vs the same with `Value` per event;
//! - key selection (lock-free snapshot) vs a mutex-guarded list sorted by load.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keyrouter::config::Policy;
use keyrouter::keys::pool::KeyPool;
use keyrouter::keys::{KeyRecord, Vault, select};
use keyrouter::sanitize::json::{Rewrite, Usage, rewrite};
use keyrouter::sanitize::stream::{Framing, StreamRewriter};
use keyrouter::secret::Secret;
use serde_json::Value;
use std::hint::black_box;
use std::sync::Mutex;

#[path = "../tests/common/records.rs"]
mod records;

const REWRITE: Rewrite<'static> = Rewrite {
    id_suffix: "kr0123456789abcdefghijklmn",
    model: Some("gpt-4o"),
    strip_usage: false,
    key: None,
};

fn completion() -> Vec<u8> {
    serde_json::json!({
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant",
            "content": "Hello! How can I assist you today? I can answer questions, write text, explain code and much more.",
            "refusal": null, "annotations": []}, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}},
        "service_tier": "default",
        "system_fingerprint": "fp_fc9f1d7035"
    })
    .to_string()
    .into_bytes()
}

/// An embeddings answer of one 1536-dimension vector.
fn embeddings() -> Vec<u8> {
    let vector: Vec<f64> = (0..1536).map(|i| f64::from(i) * -0.000_123_4).collect();
    serde_json::json!({
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": vector}],
        "model": "text-embedding-3-small-snapshot",
        "usage": {"prompt_tokens": 8, "total_tokens": 8}
    })
    .to_string()
    .into_bytes()
}

/// The naive rewrite: whole document into a `Value` and back.
fn naive_rewrite(input: &[u8]) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(input).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.insert(
        "id".into(),
        Value::String(format!("chatcmpl-{}", REWRITE.id_suffix)),
    );
    obj.insert("model".into(), Value::String("gpt-4o".into()));
    obj.remove("system_fingerprint");
    obj.remove("service_tier");
    serde_json::to_vec(&v).unwrap()
}

fn stream() -> Vec<u8> {
    let mut s = Vec::new();
    for i in 0..20 {
        s.extend_from_slice(format!(
            "data: {{\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_fc9f1d7035\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{i} \"}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
        ).as_bytes());
    }
    s.extend_from_slice(b"data: [DONE]\n\n");
    s
}

fn naive_sse(input: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(input).unwrap();
    let mut out = Vec::with_capacity(input.len());
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event.strip_prefix("data: ").unwrap();
        out.extend_from_slice(b"data: ");
        if data == "[DONE]" {
            out.extend_from_slice(data.as_bytes());
        } else {
            out.extend_from_slice(&naive_rewrite(data.as_bytes()));
        }
        out.extend_from_slice(b"\n\n");
    }
    out
}

/// One JSON body rewritten by keyrouter and by a naive `Value` round trip.
fn json_group(c: &mut Criterion, name: &str, body: &[u8], naive: fn(&[u8]) -> Vec<u8>) {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("keyrouter", |b| {
        let mut out = Vec::with_capacity(body.len() + 64);
        b.iter(|| {
            out.clear();
            let mut usage = Usage::default();
            rewrite(black_box(body), &REWRITE, &mut out, &mut usage).expect("a JSON body");
            black_box(&out);
        })
    });
    g.bench_function("naive_value", |b| {
        b.iter(|| black_box(naive(black_box(body))))
    });
    g.finish();
}

fn naive_embeddings(body: &[u8]) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(body).unwrap();
    v["model"] = Value::String("text-embedding-3-small".into());
    serde_json::to_vec(&v).unwrap()
}

fn sanitize(c: &mut Criterion) {
    json_group(c, "json_body", &completion(), naive_rewrite);
    json_group(c, "embeddings_body", &embeddings(), naive_embeddings);

    let sse = stream();
    let mut g = c.benchmark_group("sse_stream_21_events");
    g.throughput(Throughput::Bytes(sse.len() as u64));
    g.bench_function("keyrouter", |b| {
        let mut out = Vec::with_capacity(sse.len() + 256);
        b.iter(|| {
            out.clear();
            let mut usage = Usage::default();
            let mut r = StreamRewriter::new(Framing::Events, 1 << 20);
            // Provider streams arrive in pieces: one read per event here.
            for chunk in black_box(&sse).chunk_by(|a, b| !(*a == b'\n' && *b == b'd')) {
                let _ = r.push(chunk, &REWRITE, &mut usage, &mut out);
            }
            r.finish(&REWRITE, &mut usage, &mut out);
            black_box(&out);
        })
    });
    g.bench_function("naive_value", |b| {
        b.iter(|| black_box(naive_sse(black_box(&sse))))
    });
    g.finish();
}

/// Key `i` of a pool with weights 1 to 5.
fn record(i: usize, vault: &Vault) -> KeyRecord {
    KeyRecord {
        weight: 1 + (i % 5) as u32,
        ..records::active_record(i, vault)
    }
}

fn selection(c: &mut Criterion) {
    let vault = Vault::new(&[Secret::new(Vault::generate_key())]).unwrap();
    let provider = records::openai_provider();
    let mut g = c.benchmark_group("pick_key");
    for n in [1usize, 10, 100] {
        let records: Vec<KeyRecord> = (0..n).map(|i| record(i, &vault)).collect();
        let pool = KeyPool::new(std::slice::from_ref(&provider));
        pool.reload(&records, &vault);
        for policy in [Policy::LeastLoaded, Policy::RoundRobin, Policy::Weighted] {
            g.bench_with_input(BenchmarkId::new(policy.as_str(), n), &n, |b, _| {
                b.iter(|| {
                    let keys = pool.snapshot("openai").unwrap();
                    black_box(select::pick(&keys, policy, |_| true))
                })
            });
        }
        // Naive: a mutex-guarded list, sorted by load on every pick.
        let naive: Mutex<Vec<(u32, usize)>> = Mutex::new((0..n).map(|i| (0, i)).collect());
        g.bench_with_input(BenchmarkId::new("naive_mutex_sort", n), &n, |b, _| {
            b.iter(|| {
                let mut list = naive.lock().unwrap();
                list.sort_by_key(|(load, _)| *load);
                black_box(list[0].1)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, sanitize, selection);
criterion_main!(benches);
