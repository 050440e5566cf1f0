//! The `freerelay` command: `up` runs a Spin app locally, `keygen` makes client keys, `policy
//! check` validates a tenant policy file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use freerelay_cli::kv::KvStores;
use freerelay_cli::manifest::Manifest;
use freerelay_cli::runtime::{App, LoadOptions};
use freerelay_cli::variables::{load_dotenv, process_env_lookup, AppVariables};
use freerelay_cli::{keygen, server};

#[derive(Parser)]
#[command(
    name = "freerelay",
    version,
    about = "FreeRelay: run the gateway locally, manage client keys, check tenant policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a Spin application (spin.toml) with the same host interfaces as `spin up`.
    Up(UpArgs),
    /// Print a new client key and the SHA-256 digest to put in `client_keys`.
    Keygen(KeygenArgs),
    /// Tenant policies.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print the routing decision for a request body (file or stdin) offline, sending nothing.
    Explain(ExplainArgs),
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// The chat completion request body (JSON); `-` or nothing reads stdin.
    file: Option<PathBuf>,
    /// Print the decision as JSON (the shape of `GET /v1/freerelay/routes/{id}`).
    #[arg(long)]
    json: bool,
    /// The mode, as `x-freerelay-mode` would set it.
    #[arg(long, default_value = "auto")]
    mode: String,
    /// A tenant policy file to apply.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// The application manifest (its variables configure the providers, as under `up`).
    #[arg(short = 'f', long = "from", default_value = "spin.toml")]
    from: PathBuf,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Parse a policy file offline and report every error (line, column, what was expected).
    Check {
        /// The policy file.
        file: PathBuf,
    },
}

#[derive(clap::Args)]
struct UpArgs {
    /// The application manifest.
    #[arg(short = 'f', long = "from", default_value = "spin.toml")]
    from: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Spin runtime config file (`[key_value_store.<label>]`).
    #[arg(long = "runtime-config-file")]
    runtime_config_file: Option<PathBuf>,
    /// State directory (compile cache, default key-value store). Default: `<manifest dir>/.spin`.
    #[arg(long = "state-dir")]
    state_dir: Option<PathBuf>,
    /// Leave Nagle's algorithm on (no TCP_NODELAY) for client and outbound connections, as
    /// Spin does, to reproduce its delayed-ACK stalls. Also FREERELAY_SPIN_NAGLE=1.
    #[arg(long = "spin-nagle")]
    spin_nagle: bool,
}

#[derive(clap::Args)]
struct KeygenArgs {
    /// Print only the key and the digest, one per line, without labels.
    #[arg(short, long, conflicts_with = "digest_of")]
    quiet: bool,
    /// Print the digest of an existing key instead of making a new one.
    #[arg(long, value_name = "KEY")]
    digest_of: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => run_up(args),
        Command::Keygen(args) => run_keygen(args),
        Command::Policy(command) => return run_policy(command),
        Command::Explain(args) => run_explain(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_keygen(args: KeygenArgs) -> Result<()> {
    if let Some(key) = args.digest_of {
        println!("{}", keygen::digest(key.trim()));
        return Ok(());
    }
    let key = keygen::generate_key()?;
    let digest = keygen::digest(&key);
    if args.quiet {
        println!("{key}\n{digest}");
    } else {
        println!("key: {key}\ndigest: {digest}");
    }
    Ok(())
}

/// `explain`: the router's decision for one request, offline (priors only, nothing spent).
fn run_explain(args: ExplainArgs) -> Result<()> {
    use std::io::Read;
    let body = match args.file.as_deref() {
        None => None,
        Some(p) if p.as_os_str() == "-" => None,
        Some(p) => Some(std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?),
    };
    let body = match body {
        Some(b) => b,
        None => {
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .context("cannot read stdin")?;
            b
        }
    };
    let policy = match &args.policy {
        Some(p) => Some(
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        ),
        None => None,
    };
    if let Some(text) = &policy {
        if let Err(errors) = freerelay::policy::parse(text) {
            let listed: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::bail!("the policy does not parse: {}", listed.join("; "));
        }
    }
    let vars = freerelay_cli::explain::component_variables(&args.from)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let decision =
        freerelay_cli::explain::decide(&vars, &body, &args.mode, policy.as_deref(), now)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&decision)?);
    } else {
        print!("{}", freerelay_cli::explain::text(&decision));
    }
    Ok(())
}

/// `policy check FILE`: exit 0 and `FILE: ok (N rules)` when the policy parses; exit 1 and each
/// error as `FILE:LINE:COLUMN: expected …, found …` on stderr when it does not; exit 2 when the
/// file cannot be read.
fn run_policy(command: PolicyCommand) -> ExitCode {
    let PolicyCommand::Check { file } = command;
    let name = file.display();
    let bytes = match std::fs::read(&file) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("{name}: cannot read the policy file: {e}");
            return ExitCode::from(2);
        }
    };
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            // Where the first invalid byte is, counted like the parser counts.
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let valid = std::str::from_utf8(valid).unwrap_or_default();
            let line = valid.matches('\n').count() + 1;
            let column = valid.rsplit('\n').next().unwrap_or("").chars().count() + 1;
            let byte = e.as_bytes()[valid.len()];
            eprintln!("{name}:{line}:{column}: expected UTF-8 text, found byte 0x{byte:02x}");
            return ExitCode::from(1);
        }
    };
    match freerelay::policy::parse(&text) {
        Ok(policy) => {
            let n = policy.len();
            println!("{name}: ok ({n} rule{})", if n == 1 { "" } else { "s" });
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors {
                eprintln!("{name}:{}:{}: {}", e.line, e.column, e.message());
            }
            ExitCode::from(1)
        }
    }
}

fn run_up(args: UpArgs) -> Result<()> {
    let manifest = Manifest::load(&args.from)?;
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| manifest.dir.join(".spin"));
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create state directory {}", state_dir.display()))?;

    // Spin's env provider: SPIN_VARIABLE_* from the environment, then `.env` in the cwd.
    let dotenv = load_dotenv(std::path::Path::new(".env"))?;
    let variables = AppVariables::resolve(&manifest, &process_env_lookup(dotenv))?;
    let stores = Arc::new(KvStores::from_config(
        &state_dir,
        args.runtime_config_file.as_deref(),
    )?);

    let serve_opts = server::ServeOptions {
        spin_nagle: args.spin_nagle
            || std::env::var_os("FREERELAY_SPIN_NAGLE").is_some_and(|v| v == "1"),
    };

    if serve_opts.spin_nagle {
        eprintln!("note: Nagle's algorithm left on (no TCP_NODELAY), as Spin");
    }

    // This runtime only binds, accepts and waits for shutdown; requests are served by one
    // worker runtime per core (`server::serve`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // Bind first so a busy port fails before any (slow) compilation.
        let listener = server::bind(args.listen).await?;
        let local = listener.local_addr()?;
        let app = App::load(
            &manifest,
            LoadOptions {
                state_dir,
                variables,
                stores,
            },
        )?;
        app.set_self_addr(local);
        server::print_startup(&app, local);
        server::serve(app, listener, shutdown_signal(), serve_opts).await
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    eprintln!("Shutting down…");
}
