//! The HTTP front end: hyper HTTP/1.1 with keep-alive and TCP_NODELAY (unless
//! [`ServeOptions::spin_nagle`]), Spin's routing and well-known endpoints, and graceful shutdown.
//! One acceptor hands connections round-robin to one worker thread per core (see [`Workers`]).

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use wasmtime_wasi_http::WasiBody;

use crate::http_client::OutboundClient;
use crate::runtime::{full_body, App};

/// How long shutdown waits for in-flight requests and guest tasks.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Binds the listen address, with Spin's message when the port is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("{addr} is already in use")
        } else {
            anyhow::anyhow!("Unable to listen on {addr}: {e}")
        }
    })
}

/// How `serve` treats connections.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServeOptions {
    /// Leave Nagle's algorithm on for accepted and outbound connections, as Spin does, instead
    /// of setting TCP_NODELAY. A response or request written in more than one piece (a head,
    /// then body chunks) then waits for the peer's delayed ACK (~40 ms on Linux loopback) before
    /// its second piece goes out: Spin's stall, reproducible locally (`freerelay up --spin-nagle`).
    pub spin_nagle: bool,
}

/// Prints Spin's startup lines (`Serving http://…` and the routes) to stdout and flushes.
pub fn print_startup(app: &App, local: SocketAddr) {
    let base = format!("http://{local}");
    let mut out = String::new();
    out.push_str(&format!("\nServing {base}\nAvailable Routes:\n"));
    for r in app.router.routes() {
        out.push_str(&format!("  {}: {base}{r}\n", r.component));
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

/// The serving threads: one current-thread tokio runtime per core, each on its own thread.
///
/// A connection is handed to one worker and everything its requests start — the guest task,
/// the guest's outbound requests and the pooled connections they use — runs on that worker's
/// thread, so a request never waits for a wake-up from another thread. Each worker has its own
/// outbound connection pool (hyper-util's client runs connection tasks on the runtime that
/// opened them).
struct Workers {
    workers: Vec<Worker>,
    next: usize,
}

struct Worker {
    handle: tokio::runtime::Handle,
    outbound: OutboundClient,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn start(opts: ServeOptions) -> anyhow::Result<Self> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut workers = Self {
            workers: Vec::with_capacity(n),
            next: 0,
        };
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| anyhow::anyhow!("cannot start worker runtime: {e}"))?;
            let handle = rt.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("freerelay-worker-{i}"))
                .spawn(move || {
                    // Runs the worker's tasks until told to stop; dropping the runtime then
                    // drops whatever is left (as dropping a multi-threaded runtime would).
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                })
                .map_err(|e| anyhow::anyhow!("cannot start worker thread: {e}"))?;
            workers.workers.push(Worker {
                handle,
                outbound: OutboundClient::with_nodelay(!opts.spin_nagle),
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(workers)
    }

    /// The next worker, round-robin: its runtime handle and its outbound client.
    fn pick(&mut self) -> (&tokio::runtime::Handle, OutboundClient) {
        let w = &self.workers[self.next];
        self.next = (self.next + 1) % self.workers.len();
        (&w.handle, w.outbound.clone())
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
        for w in &mut self.workers {
            if let Some(thread) = w.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Serves until `shutdown` resolves, then drains in-flight work (bounded by [`SHUTDOWN_GRACE`]).
///
/// This task only accepts; connections are served by [`Workers`].
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    opts: ServeOptions,
) -> anyhow::Result<()> {
    let mut workers = Workers::start(opts)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, client_addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Typically EMFILE: back off briefly instead of spinning.
                        eprintln!("warning: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if !opts.spin_nagle {
                    if let Err(e) = stream.set_nodelay(true) {
                        eprintln!("warning: cannot set TCP_NODELAY: {e}");
                    }
                }
                // Move the socket to the worker's own I/O driver.
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("warning: connection from {client_addr}: {e}");
                        continue;
                    }
                };
                let (handle, outbound) = workers.pick();
                let app = app.clone();
                let stop_rx = stop_rx.clone();
                let guard = app.inflight.enter();
                handle.spawn(async move {
                    let _guard = guard;
                    serve_connection(app, stream, client_addr, outbound, stop_rx).await;
                });
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    if !app.inflight.wait_idle(SHUTDOWN_GRACE).await {
        eprintln!(
            "warning: {} request(s) still running after {}s; exiting anyway",
            app.inflight.count(),
            SHUTDOWN_GRACE.as_secs()
        );
    }
    drop(workers);
    Ok(())
}

/// Serves one keep-alive connection on the current worker until it closes or shutdown.
async fn serve_connection(
    app: Arc<App>,
    stream: std::net::TcpStream,
    client_addr: SocketAddr,
    outbound: OutboundClient,
    mut stop_rx: watch::Receiver<bool>,
) {
    let stream = match tokio::net::TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("warning: connection from {client_addr}: {e}");
            return;
        }
    };
    let service = service_fn(move |req| {
        let app = app.clone();
        let outbound = outbound.clone();
        async move { Ok::<_, Infallible>(handle(app, req, client_addr, &outbound).await) }
    });
    let conn = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { stop_rx.wait_for(|stop| *stop).await.map(drop) } => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        if !e.is_incomplete_message() {
            eprintln!("warning: connection from {client_addr}: {e}");
        }
    }
}

/// Routes one public request.
async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
    client_addr: SocketAddr,
    outbound: &OutboundClient,
) -> Response<WasiBody> {
    let path = req.uri().path().to_string();
    if let Some(well_known) = path.strip_prefix("/.well-known/spin/") {
        return match well_known {
            "health" => Response::new(full_body("OK")),
            "info" => {
                let info = serde_json::json!({
                    "name": app.name,
                    "version": app.version,
                    "bindle_version": null,
                    "oci_image_digest": null,
                });
                let mut r = Response::new(full_body(
                    serde_json::to_vec_pretty(&info).unwrap_or_default(),
                ));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                r
            }
            _ => not_found(),
        };
    }
    let Some(route) = app.router.route(&path) else {
        return not_found();
    };
    let req = req.map(|b| b.map_err(wasmtime_wasi_http::Error::from).boxed_unsync());
    app.handle(req, &route, client_addr, outbound).await
}

fn not_found() -> Response<WasiBody> {
    let mut r = Response::new(full_body(""));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}
