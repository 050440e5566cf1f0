//! Outbound HTTP for guests: a pooled hyper-util client (one per serving worker thread), as Spin's
//! `factor-outbound-http` does (connections are reused per scheme + authority), with the guest's
//! request options honoured:
//!
//! - connect timeout: TCP connect plus TLS handshake of a *new* connection (a pooled connection
//!   needs no connect, as in Spin);
//! - first-byte timeout: from sending (including any connect) to the response head, as in Spin;
//! - between-bytes timeout: while the guest waits for the next chunk of the response body.
//!
//! Timeouts map to the same error codes as wasmtime-wasi-http's default sender
//! (`ConnectionTimeout`, `ConnectionReadTimeout`), and so do connect, TLS and protocol errors.
//! TLS is set up exactly as in that default sender (rustls with the webpki roots, HTTP/1.1).

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

/// wasi:http's default for every timeout the guest does not set (as Spin and wasmtime).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

tokio::task_local! {
    /// The connect timeout of the request being sent. hyper-util gives the connector only the
    /// URI, so the per-request option travels in a task-local (as in Spin); it is read when the
    /// connector is called, which happens inside the request's own future.
    static CONNECT_TIMEOUT: Duration;
}

/// A pooled outbound HTTP client. Its connection tasks run on the runtime that opened them, so
/// `freerelay up` gives each worker thread its own.
#[derive(Clone)]
pub struct OutboundClient {
    client: Client<Connector, WasiBody>,
}

impl OutboundClient {
    /// A client with hyper-util's default pool (idle connections kept per scheme + authority)
    /// whose connections set TCP_NODELAY.
    pub fn new() -> Self {
        Self::with_nodelay(true)
    }

    /// [`Self::new`], choosing TCP_NODELAY: `false` leaves Nagle's algorithm on, as Spin's
    /// outbound connections do (`freerelay up --spin-nagle`).
    pub fn with_nodelay(nodelay: bool) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build(Connector::new(nodelay));
        Self { client }
    }

    /// Sends `request` (absolute URI) and waits for the response head.
    pub async fn send(
        &self,
        request: Request<WasiBody>,
        options: Option<RequestOptions>,
    ) -> Result<Response<WasiBody>, Error> {
        let connect_timeout = options
            .and_then(|o| o.connect_timeout)
            .unwrap_or(DEFAULT_TIMEOUT);
        let first_byte_timeout = options
            .and_then(|o| o.first_byte_timeout)
            .unwrap_or(DEFAULT_TIMEOUT);
        let between_bytes_timeout = options
            .and_then(|o| o.between_bytes_timeout)
            .unwrap_or(DEFAULT_TIMEOUT);
        if request.uri().authority().is_none() {
            return Err(Error::HttpRequestUriInvalid);
        }
        let response = CONNECT_TIMEOUT.scope(connect_timeout, self.client.request(request));
        let response = tokio::time::timeout(first_byte_timeout, response)
            .await
            .map_err(|_| Error::ConnectionReadTimeout)?
            .map_err(client_error)?;
        Ok(response.map(|body| {
            BetweenBytes {
                body,
                timeout: between_bytes_timeout,
                sleep: None,
                armed: false,
            }
            .boxed_unsync()
        }))
    }
}

impl Default for OutboundClient {
    fn default() -> Self {
        Self::new()
    }
}

/// Maps a hyper-util client error to the error the default sender would have returned.
fn client_error(err: hyper_util::client::legacy::Error) -> Error {
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(connect) = e.downcast_ref::<ConnectError>() {
            if let Some(inner) = connect.take() {
                return inner;
            }
        }
        if let Some(hyper_err) = e.downcast_ref::<hyper::Error>() {
            // As wasmtime-wasi-http maps `Error::Hyper`: an error code carried as the source
            // (e.g. from the guest's request body), else a protocol error.
            return match hyper_err
                .source()
                .and_then(|s| s.downcast_ref::<ErrorCode>())
            {
                Some(code) => Error::from(code.clone()),
                None => Error::HttpProtocolError,
            };
        }
        source = e.source();
    }
    if err.is_connect() {
        Error::ConnectionRefused
    } else {
        Error::HttpProtocolError
    }
}

/// A connect failure, carried through hyper-util's error so [`client_error`] can return the
/// original [`Error`] (hyper-util only exposes errors by reference).
#[derive(Debug)]
struct ConnectError(Mutex<Option<Error>>);

impl ConnectError {
    fn new(e: Error) -> Self {
        Self(Mutex::new(Some(e)))
    }

    fn take(&self) -> Option<Error> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => write!(f, "{e}"),
            None => f.write_str("connect error"),
        }
    }
}

impl StdError for ConnectError {}

/// Opens TCP (and, for `https`, TLS) connections for the pool.
#[derive(Clone)]
struct Connector {
    tls: Arc<rustls::ClientConfig>,
    nodelay: bool,
}

impl Connector {
    fn new(nodelay: bool) -> Self {
        // The same configuration as wasmtime-wasi-http's default sender, built once.
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.into(),
        };
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            tls: Arc::new(config),
            nodelay,
        }
    }

    async fn connect(
        tls: Arc<rustls::ClientConfig>,
        nodelay: bool,
        uri: Uri,
        timeout: Duration,
    ) -> Result<Stream, Error> {
        let use_tls = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let host = uri.host().ok_or(Error::HttpRequestUriInvalid)?;
        let port = uri.port_u16().unwrap_or(if use_tls { 443 } else { 80 });
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let connect = async {
            let tcp = match bare_host.parse::<IpAddr>() {
                Ok(ip) => TcpStream::connect((ip, port)).await,
                Err(_) => TcpStream::connect((bare_host, port)).await,
            }
            .map_err(Error::Connect)?;
            // Loopback and pooled connections would otherwise pay Nagle + delayed-ACK stalls.
            if nodelay {
                let _ = tcp.set_nodelay(true);
            }
            if !use_tls {
                return Ok(Stream::Tcp(tcp));
            }
            let name = match bare_host.parse::<IpAddr>() {
                Ok(ip) => ServerName::from(ip),
                Err(_) => ServerName::try_from(bare_host.to_string())?,
            };
            let tls = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(Error::Tls)?;
            Ok(Stream::Tls(Box::new(tls)))
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| Error::ConnectionTimeout)?
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<TokioIo<Stream>, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = CONNECT_TIMEOUT.try_with(|t| *t).unwrap_or(DEFAULT_TIMEOUT);
        let tls = self.tls.clone();
        let nodelay = self.nodelay;
        Box::pin(async move {
            Self::connect(tls, nodelay, uri, timeout)
                .await
                .map(TokioIo::new)
                .map_err(ConnectError::new)
        })
    }
}

/// A plain or TLS connection.
enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A response body that fails with `ConnectionReadTimeout` when the next frame takes longer
/// than the between-bytes timeout (the clock starts when the guest finds no data ready).
struct BetweenBytes {
    body: Incoming,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl Body for BetweenBytes {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.armed = false;
                Poll::Ready(frame.map(|f| {
                    f.map_err(|e| {
                        if e.is_timeout() {
                            Error::HttpResponseTimeout
                        } else {
                            Error::Hyper(e)
                        }
                    })
                }))
            }
            Poll::Pending => {
                if !this.armed {
                    let deadline = tokio::time::Instant::now() + this.timeout;
                    match &mut this.sleep {
                        Some(sleep) => sleep.as_mut().reset(deadline),
                        None => this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    this.armed = true;
                }
                let sleep = this.sleep.as_mut().expect("armed above");
                ready!(sleep.as_mut().poll(cx));
                Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
