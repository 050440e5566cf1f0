//! `freerelay-load --url URL --key KEY --concurrency C --duration-secs S [--warmup-secs W]
//! [--stream] [--body FILE] [--header 'name: value']… [--raw-path] [--json]`: C keep-alive connections looping chat-completions requests
//! against a loopback target; prints `{requests, errors, rps, p50_us, p90_us, p99_us, max_us}`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use freerelay_testkit::client::Target;
use freerelay_testkit::load::{self, LoadConfig};

#[derive(Parser, Debug)]
#[command(
    name = "freerelay-load",
    about = "Keep-alive load generator for loopback chat-completions endpoints"
)]
struct Args {
    /// Base URL (e.g. http://127.0.0.1:8080/v1) or the full chat-completions URL.
    #[arg(long)]
    url: String,
    /// Sent as `Authorization: Bearer <key>` (not sent when empty).
    #[arg(long, default_value = "")]
    key: String,
    /// A further request header, `name: value` (repeatable), e.g. `x-api-key: KEY`.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Use the URL's path as it is (a native endpoint such as `/v1/messages`), instead of
    /// appending `/chat/completions` when it lacks it.
    #[arg(long)]
    raw_path: bool,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    #[arg(long, default_value_t = 5.0)]
    duration_secs: f64,
    #[arg(long, default_value_t = 0.0)]
    warmup_secs: f64,
    /// Ask for a streamed answer (`"stream": true`).
    #[arg(long)]
    stream: bool,
    /// Request body (JSON) instead of the default small request with model `auto`.
    #[arg(long)]
    body: Option<PathBuf>,
    /// Per-request time limit; slower requests count as errors.
    #[arg(long, default_value_t = 30.0)]
    timeout_secs: f64,
    /// Runtime worker threads (1: single-threaded).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn secs(s: f64, what: &str) -> Result<Duration, String> {
    if !(0.0..=3600.0).contains(&s) {
        return Err(format!("{what} must be between 0 and 3600 seconds"));
    }
    Ok(Duration::from_secs_f64(s))
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("freerelay-load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let duration = secs(args.duration_secs, "--duration-secs")?;
    let warmup = secs(args.warmup_secs, "--warmup-secs")?;
    let request_timeout = secs(args.timeout_secs, "--timeout-secs")?;
    let body = match &args.body {
        Some(path) => {
            let raw = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            if args.stream {
                load::make_streaming(&raw).map_err(|e| e.to_string())?
            } else {
                Bytes::from(raw)
            }
        }
        None => load::default_body(args.stream),
    };
    let mut headers = Vec::new();
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("--header {h:?}: expected `name: value`"))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .map_err(|e| e.to_string())?;
    let report = runtime.block_on(async {
        let mut target = Target::parse(&args.url).await.map_err(|e| e.to_string())?;
        if !args.raw_path && !target.path.ends_with("/chat/completions") {
            target.path = format!("{}/chat/completions", target.path.trim_end_matches('/'));
        }
        Ok::<_, String>(
            load::run(LoadConfig {
                target,
                key: args.key.clone(),
                concurrency: args.concurrency.max(1),
                duration,
                warmup,
                body,
                request_timeout,
                headers: headers.clone(),
            })
            .await,
        )
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("report serialises")
        );
    } else {
        println!(
            "{} requests, {} errors, {:.1} req/s; latency p50 {} µs, p90 {} µs, p99 {} µs, max {} µs",
            report.requests,
            report.errors,
            report.rps,
            report.p50_us,
            report.p90_us,
            report.p99_us,
            report.max_us
        );
    }
    Ok(())
}
