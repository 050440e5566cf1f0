//! A small HTTP/1.1 client for loopback targets: one keep-alive connection with TCP_NODELAY, as
//! real SDKs use. Shared by the load generator and the tests.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Where requests go: an `http://host:port/path` URL, resolved once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` as written, for the `Host` header.
    pub authority: String,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Target {
    /// Parses and resolves `http://host:port/path`. Refuses anything that does not resolve to
    /// loopback addresses only: these tools never send traffic off the machine.
    pub async fn parse(url: &str) -> io::Result<Target> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "only http:// URLs are supported",
            )
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let lookup = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(lookup).await?.collect();
        let addr = *addrs.first().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{authority} did not resolve"),
            )
        })?;
        if addrs.iter().any(|a| !a.ip().is_loopback()) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{authority} is not a loopback address; refusing to send traffic"),
            ));
        }
        Ok(Target {
            addr,
            authority: authority.to_string(),
            path: path.to_string(),
        })
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    authority: String,
}

impl Conn {
    /// Connects with TCP_NODELAY.
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            authority: addr.to_string(),
        })
    }

    /// Uses `authority` as the `Host` header instead of the socket address.
    pub fn with_authority(mut self, authority: impl Into<String>) -> Self {
        self.authority = authority.into();
        self
    }

    /// True while the connection can take another request.
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }

    /// Sends a request and returns the response with its body still streaming.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> io::Result<http::Response<Incoming>> {
        let mut req = Request::builder().method(method).uri(path);
        let h = req.headers_mut().expect("builder is valid");
        h.insert(
            HOST,
            HeaderValue::from_str(&self.authority).map_err(io::Error::other)?,
        );
        for (name, value) in headers {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).map_err(io::Error::other)?,
                HeaderValue::from_str(value).map_err(io::Error::other)?,
            );
        }
        let req = req.body(Full::new(body)).map_err(io::Error::other)?;
        self.sender.ready().await.map_err(io::Error::other)?;
        self.sender
            .send_request(req)
            .await
            .map_err(io::Error::other)
    }

    /// Sends a request and reads the whole response.
    pub async fn fetch(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> io::Result<Fetched> {
        let resp = self.send(method, path, headers, body).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
        Ok(Fetched {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Fetched {
    /// The body as JSON (panics if it is not: for tests).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The data frames of a streaming body with the time each arrived (since `start`), and how the
/// body ended: `Ok` for a clean end, `Err` for a broken connection.
pub async fn timed_frames(
    body: Incoming,
    start: Instant,
    limit: Duration,
) -> (Vec<(Duration, Bytes)>, Result<(), String>) {
    let mut body = body;
    let mut frames = Vec::new();
    let deadline = start + limit;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, body.frame()).await {
            Err(_) => return (frames, Err("timed out".into())),
            Ok(None) => return (frames, Ok(())),
            Ok(Some(Err(e))) => return (frames, Err(e.to_string())),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    frames.push((start.elapsed(), data));
                }
            }
        }
    }
}

/// Splits a server-sent-events text into its `data:` payloads, in order (`\n` or `\r\n` line
/// ends).
pub fn sse_data(text: &str) -> Vec<String> {
    sse_events(text).into_iter().map(|(_, data)| data).collect()
}

/// Splits a server-sent-events text into its events: the `event:` name (if any) and the `data:`
/// payload, in order (`\n` or `\r\n` line ends). Events without data are left out.
pub fn sse_events(text: &str) -> Vec<(Option<String>, String)> {
    let text = text.replace("\r\n", "\n");
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .filter_map(|event| {
            let mut name = None;
            let mut data: Vec<&str> = Vec::new();
            for line in event.lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.strip_prefix(' ').unwrap_or(d));
                } else if let Some(n) = line.strip_prefix("event:") {
                    name = Some(n.trim().to_string());
                }
            }
            (!data.is_empty()).then(|| (name, data.join("\n")))
        })
        .collect()
}
