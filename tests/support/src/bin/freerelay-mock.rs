//! `freerelay-mock --listen 127.0.0.1:0 --api-key KEY [--api-key KEY2,KEY3] [--name groq]`: a mock
//! provider speaking OpenAI chat completions, Anthropic Messages and Gemini generateContent.
//! Prints `listening on http://127.0.0.1:PORT` once ready and serves until killed.

use std::io::Write;
use std::net::SocketAddr;

use clap::Parser;
use freerelay_testkit::{MockConfig, MockProvider};

#[derive(Parser, Debug)]
#[command(
    name = "freerelay-mock",
    about = "Mock provider (OpenAI, Anthropic and Gemini wire formats) for tests and benchmarks"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// A provider key clients may send (OpenAI `Authorization: Bearer <key>`, Anthropic
    /// `x-api-key`, Gemini `x-goog-api-key` or `?key=`). Repeat it, or give a comma-separated
    /// list, to accept several.
    #[arg(long = "api-key", value_delimiter = ',', required = true)]
    api_keys: Vec<String>,
    /// Provider name shown in replies (`mock(<name>): …`) and model listings.
    #[arg(long, default_value = "mock")]
    name: String,
    /// Benchmark fast path: one precomputed reply for non-streaming requests, nothing recorded.
    #[arg(long)]
    fixed: bool,
    /// Do not record requests (GET /_mock/requests stays empty).
    #[arg(long)]
    no_record: bool,
    /// Model ids served by GET …/models (comma-separated).
    #[arg(long, value_delimiter = ',')]
    models: Option<Vec<String>>,
    /// Anthropic: reject a conversation ending with an assistant message (no prefill, as newer
    /// Claude models).
    #[arg(long)]
    reject_prefill: bool,
    /// OpenAI: answer 422 to any `stream_options` (as Mistral).
    #[arg(long)]
    reject_stream_options: bool,
    /// Worker threads (1: a single-threaded runtime, lightest on small machines).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(async move {
        let mut config = MockConfig::new(args.name, "")
            .with_keys(args.api_keys.into_iter().filter(|k| !k.is_empty()));
        config.listen = args.listen;
        config.reject_prefill = args.reject_prefill;
        config.reject_stream_options = args.reject_stream_options;
        config.fixed = args.fixed;
        config.record = !args.no_record && !args.fixed;
        if let Some(models) = args.models {
            config.models = models;
        }
        let handle = MockProvider::start(config).await?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", handle.url())?;
        out.flush()?;
        drop(out);
        handle.serve_forever().await;
        Ok(())
    })
}
