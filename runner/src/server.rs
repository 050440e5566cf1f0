//! The HTTP front end: hyper HTTP/1.1 with keep-alive and TCP_NODELAY, Spin's routing and
//! well-known endpoints, and graceful shutdown.

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
use tokio::sync::watch;
use wasmtime_wasi_http::WasiBody;

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

/// Serves until `shutdown` resolves, then drains in-flight work (bounded by [`SHUTDOWN_GRACE`]).
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
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
                if let Err(e) = stream.set_nodelay(true) {
                    eprintln!("warning: cannot set TCP_NODELAY: {e}");
                }
                let app = app.clone();
                let mut stop_rx = stop_rx.clone();
                let guard = app.inflight.enter();
                tokio::spawn(async move {
                    let _guard = guard;
                    let svc_app = app.clone();
                    let service = service_fn(move |req| {
                        let app = svc_app.clone();
                        async move { Ok::<_, Infallible>(handle(app, req, client_addr).await) }
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
    Ok(())
}

/// Routes one public request.
async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
    client_addr: SocketAddr,
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
    app.handle(req, &route, client_addr).await
}

fn not_found() -> Response<WasiBody> {
    let mut r = Response::new(full_body(""));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}
