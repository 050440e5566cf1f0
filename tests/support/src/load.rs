//! The load generator: C keep-alive connections, each sending chat-completions requests back to
//! back for a bounded time, every request's latency recorded.

use std::io;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use serde::Serialize;

use crate::client::{Conn, Target};

/// The default request: small, non-streaming, model `auto`.
pub fn default_body(stream: bool) -> Bytes {
    let mut body = serde_json::json!({
        "model": "auto",
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "max_tokens": 16
    });
    if stream {
        body["stream"] = serde_json::Value::Bool(true);
    }
    Bytes::from(body.to_string())
}

/// Sets `"stream": true` in a JSON request body.
pub fn make_streaming(body: &[u8]) -> io::Result<Bytes> {
    let mut value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("body: {e}")))?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "body is not a JSON object"))?;
    obj.insert("stream".into(), serde_json::Value::Bool(true));
    Ok(Bytes::from(value.to_string()))
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub target: Target,
    pub key: String,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub body: Bytes,
    /// A request taking longer than this counts as an error (and its connection is replaced).
    pub request_timeout: Duration,
    /// Further request headers (a provider's own key header, for a direct baseline).
    pub headers: Vec<(String, String)>,
}

/// What a run measured (after warm-up).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoadReport {
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub mean_us: u64,
    pub concurrency: usize,
    pub duration_secs: f64,
}

/// Nearest-rank percentile of sorted values (`p` in 0..=100).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct WorkerResult {
    latencies_us: Vec<u64>,
    errors: u64,
}

async fn one_request(conn: &mut Conn, cfg: &LoadConfig, auth: &str) -> io::Result<bool> {
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if !cfg.key.is_empty() {
        headers.push(("authorization", auth));
    }
    headers.extend(cfg.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let resp = conn
        .send(Method::POST, &cfg.target.path, &headers, cfg.body.clone())
        .await?;
    let ok = resp.status().is_success();
    // Read the whole body: a request is done when its last byte is in.
    resp.into_body().collect().await.map_err(io::Error::other)?;
    Ok(ok)
}

async fn worker(cfg: LoadConfig, measure_from: Instant, stop_at: Instant) -> WorkerResult {
    let auth = format!("Bearer {}", cfg.key);
    let mut result = WorkerResult {
        latencies_us: Vec::with_capacity(4096),
        errors: 0,
    };
    let mut conn: Option<Conn> = None;
    while Instant::now() < stop_at {
        if conn.as_ref().is_none_or(|c| !c.is_open()) {
            match Conn::connect(cfg.target.addr).await {
                Ok(c) => conn = Some(c.with_authority(cfg.target.authority.clone())),
                Err(_) => {
                    if Instant::now() >= measure_from {
                        result.errors += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        let start = Instant::now();
        let outcome = tokio::time::timeout(cfg.request_timeout, one_request(c, &cfg, &auth)).await;
        let elapsed = start.elapsed();
        let measured = start >= measure_from;
        match outcome {
            Ok(Ok(true)) => {
                if measured {
                    result.latencies_us.push(elapsed.as_micros() as u64);
                }
            }
            Ok(Ok(false)) => {
                if measured {
                    result.errors += 1;
                }
            }
            Ok(Err(_)) | Err(_) => {
                if measured {
                    result.errors += 1;
                }
                conn = None;
            }
        }
    }
    result
}

/// Runs the load and reports on the measured window (after warm-up).
pub async fn run(cfg: LoadConfig) -> LoadReport {
    let start = Instant::now();
    let measure_from = start + cfg.warmup;
    let stop_at = measure_from + cfg.duration;
    let mut tasks = Vec::with_capacity(cfg.concurrency);
    for _ in 0..cfg.concurrency.max(1) {
        tasks.push(tokio::spawn(worker(cfg.clone(), measure_from, stop_at)));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        if let Ok(r) = task.await {
            latencies.extend(r.latencies_us);
            errors += r.errors;
        }
    }
    let window = Instant::now().saturating_duration_since(measure_from);
    latencies.sort_unstable();
    let requests = latencies.len() as u64;
    let mean_us = latencies
        .iter()
        .sum::<u64>()
        .checked_div(requests)
        .unwrap_or(0);
    LoadReport {
        requests,
        errors,
        rps: if window.is_zero() {
            0.0
        } else {
            (requests as f64 / window.as_secs_f64() * 10.0).round() / 10.0
        },
        p50_us: percentile(&latencies, 50.0),
        p90_us: percentile(&latencies, 90.0),
        p99_us: percentile(&latencies, 99.0),
        max_us: latencies.last().copied().unwrap_or(0),
        mean_us,
        concurrency: cfg.concurrency,
        duration_secs: (window.as_secs_f64() * 1000.0).round() / 1000.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 50.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
