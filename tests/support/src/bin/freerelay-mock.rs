//! `freerelay-mock --listen 127.0.0.1:0 --api-key KEY [--name groq]`: a mock OpenAI-compatible
//! provider. Prints `listening on http://127.0.0.1:PORT` once ready and serves until killed.

use std::io::Write;
use std::net::SocketAddr;

use clap::Parser;
use freerelay_testkit::{MockConfig, MockProvider};

#[derive(Parser, Debug)]
#[command(
    name = "freerelay-mock",
    about = "Mock OpenAI-compatible provider for tests and benchmarks"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The provider key clients must send as `Authorization: Bearer <key>`.
    #[arg(long)]
    api_key: String,
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
        let mut config = MockConfig::new(args.name, args.api_key);
        config.listen = args.listen;
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
