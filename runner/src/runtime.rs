//! The wasmtime side: engine, compile cache, linker with Spin's host interfaces, per-request
//! instances, and outbound HTTP hooks (allowed hosts, service chaining, self requests).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, Notify};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Enabled, Engine, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::{
    RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView,
};

use crate::http_client::OutboundClient;
use crate::kv::host::KvInstance;
use crate::kv::KvStores;
use crate::manifest::Manifest;
use crate::outbound::{service_chaining_target, AllowedHosts};
use crate::routes::{RouteMatch, Router};
use crate::stdio::{GuestOutput, Target};
use crate::variables::AppVariables;

/// The client address Spin reports for service-chained requests.
const CHAINED_CLIENT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// A component's resolved variables (for `fermyon:spin/variables` and `wasi:config/store`).
#[derive(Debug, Default)]
pub struct ComponentVars {
    /// The component id (used in Spin's "undefined" messages).
    pub component_id: String,
    /// Variable name → final value.
    pub values: HashMap<String, String>,
}

/// Everything one guest instance can reach; lives in the wasmtime `Store`.
pub struct HostState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    /// Resource table shared by WASI, wasi:http and the Spin interfaces.
    pub table: ResourceTable,
    hooks: OutboundHooks,
    /// Key-value access for this component.
    pub kv: KvInstance,
    /// This component's variables.
    pub vars: Arc<ComponentVars>,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// One runnable component.
struct ComponentRuntime {
    pre: ProxyPre<HostState>,
    env: Vec<(String, String)>,
    allowed_hosts: Arc<AllowedHosts>,
    kv_allowed: Arc<HashSet<String>>,
    vars: Arc<ComponentVars>,
}

/// Counts in-flight work (connections and guest tasks) so shutdown can wait for it.
#[derive(Default)]
pub struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

/// Decrements the in-flight count when dropped.
pub struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    /// Registers one unit of work.
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    /// Waits until nothing is in flight, or `limit` elapses; returns whether it drained.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.count.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// Current count (diagnostics).
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The loaded application: router, components and shared state.
pub struct App {
    /// Application name from the manifest.
    pub name: String,
    /// Application version from the manifest (for `/.well-known/spin/info`).
    pub version: Option<String>,
    /// Public routes.
    pub router: Router,
    engine: Engine,
    components: HashMap<String, ComponentRuntime>,
    stores: Arc<KvStores>,
    self_addr: OnceLock<SocketAddr>,
    /// In-flight connections and guest tasks.
    pub inflight: Arc<InFlight>,
}

/// Options for loading an application.
pub struct LoadOptions {
    /// `<state-dir>`: holds the compile cache and the default SQLite store.
    pub state_dir: PathBuf,
    /// Resolved application variables.
    pub variables: AppVariables,
    /// Configured key-value stores.
    pub stores: Arc<KvStores>,
}

/// Builds the engine: async, component model, pooling allocator when the host allows it.
fn make_engine() -> Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    let mut pooled = config.clone();
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(1000)
        .total_core_instances(4000)
        .total_memories(2000)
        .total_tables(4000)
        .max_memories_per_component(16)
        .max_tables_per_component(32)
        .max_core_instances_per_component(64);
    if PoolingAllocationConfig::is_pagemap_scan_available() {
        // Reset only the pages an instance dirtied (found with Linux's PAGEMAP_SCAN) and keep
        // them resident, instead of `madvise`-ing the whole memory away and taking a page
        // fault on every page the next instance touches. Without the ioctl this would mean
        // a `memset` of the whole region, so it stays off there.
        pool.pagemap_scan(Enabled::Yes)
            .linear_memory_keep_resident(16 << 20)
            .table_keep_resident(1 << 20);
    }
    pooled.allocation_strategy(pool);
    match Engine::new(&pooled) {
        Ok(e) => Ok(e),
        Err(err) => {
            eprintln!("note: pooling allocator unavailable ({err:#}); using on-demand allocation");
            Engine::new(&config).map_err(|e| anyhow::anyhow!("{e:#}"))
        }
    }
}

/// Loads a component through the compile cache `<cache>/<sha256>.cwasm`.
///
/// The key covers the wasm bytes and the engine's compatibility hash (wasmtime version and
/// compilation settings), so an upgrade never loads a stale artifact.
fn load_component(engine: &Engine, wasm: &[u8], cache_dir: &Path) -> Result<Component> {
    let mut compat = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut compat);
    let mut digest = Sha256::new();
    digest.update(wasm);
    digest.update(compat.finish().to_le_bytes());
    digest.update(b"freerelay-runner-cache-v1");
    let key: String = digest
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = cache_dir.join(format!("{key}.cwasm"));
    if path.exists() {
        // SAFETY: the artifact was written by this program (below) into its own state
        // directory and wasmtime re-checks its compatibility header before using it.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => return Ok(c),
            Err(e) => eprintln!(
                "note: ignoring unusable compile cache {}: {e:#}",
                path.display()
            ),
        }
    }
    let component = Component::new(engine, wasm).map_err(|e| anyhow::anyhow!("{e:#}"))?;
    let bytes = component
        .serialize()
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;
    if let Err(e) = std::fs::create_dir_all(cache_dir).and_then(|_| {
        let tmp = cache_dir.join(format!("{key}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path)
    }) {
        eprintln!("note: cannot write compile cache {}: {e}", path.display());
    }
    Ok(component)
}

impl App {
    /// Compiles (or loads from cache) and links every triggered component.
    pub fn load(manifest: &Manifest, opts: LoadOptions) -> Result<Arc<Self>> {
        let engine = make_engine()?;
        let router = Router::build(&manifest.http_triggers)?;

        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        crate::bindings::SpinHost::add_to_linker::<HostState, HasSelf<HostState>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| anyhow::anyhow!("{e:#}"))?;

        let cache_dir = opts.state_dir.join("cache");
        let mut components = HashMap::new();
        for id in manifest.triggered_components() {
            let decl = &manifest.components[&id];
            let allowed_hosts = AllowedHosts::parse(&decl.allowed_outbound_hosts, &opts.variables)
                .with_context(|| format!("component '{id}': invalid allowed_outbound_hosts"))?;
            for label in &decl.key_value_stores {
                if !opts.stores.is_defined(label) {
                    bail!("unknown key_value_stores label {label:?} for component {id:?}");
                }
            }
            let values = opts
                .variables
                .component_values(&decl.variables)
                .with_context(|| format!("component '{id}': invalid variables"))?;
            let wasm = std::fs::read(&decl.source).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    anyhow::anyhow!(
                        "component '{id}': source '{}' not found — run scripts/build",
                        decl.source_display
                    )
                } else {
                    anyhow::anyhow!(
                        "component '{id}': cannot read '{}': {e}",
                        decl.source.display()
                    )
                }
            })?;
            let component = load_component(&engine, &wasm, &cache_dir).with_context(|| {
                format!("component '{id}': cannot compile '{}'", decl.source_display)
            })?;
            let pre = linker
                .instantiate_pre(&component)
                .map_err(|e| anyhow::anyhow!("{e:#}"))
                .and_then(|p| ProxyPre::new(p).map_err(|e| anyhow::anyhow!("{e:#}")))
                .with_context(|| {
                    format!("component '{id}' cannot run here (it must export wasi:http/incoming-handler and import only Spin/WASI interfaces this runner provides)")
                })?;
            components.insert(
                id.clone(),
                ComponentRuntime {
                    pre,
                    env: decl.environment.clone(),
                    allowed_hosts: Arc::new(allowed_hosts),
                    kv_allowed: Arc::new(decl.key_value_stores.iter().cloned().collect()),
                    vars: Arc::new(ComponentVars {
                        component_id: id.clone(),
                        values,
                    }),
                },
            );
        }

        Ok(Arc::new(Self {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            router,
            engine,
            components,
            stores: opts.stores,
            self_addr: OnceLock::new(),
            inflight: Arc::new(InFlight::default()),
        }))
    }

    /// Records the bound address (target of relative "self" requests).
    pub fn set_self_addr(&self, addr: SocketAddr) {
        let _ = self.self_addr.set(addr);
    }

    /// Runs `component` on a request that has already been routed. Never fails: errors become 500s.
    ///
    /// `outbound` is the pooled client of the serving worker thread (see `server`): the guest's
    /// outbound requests use it, so their connections live on the same thread as the guest.
    pub async fn handle(
        self: &Arc<Self>,
        mut req: Request<WasiBody>,
        route: &RouteMatch,
        client_addr: SocketAddr,
        outbound: &OutboundClient,
    ) -> Response<WasiBody> {
        match self
            .run_component(&mut req, route, client_addr, outbound)
            .await
        {
            Ok(resp) => resp,
            Err(e) => {
                eprintln!("error: component '{}' failed: {e:#}", route.component);
                internal_error()
            }
        }
    }

    async fn run_component(
        self: &Arc<Self>,
        req: &mut Request<WasiBody>,
        route: &RouteMatch,
        client_addr: SocketAddr,
        outbound: &OutboundClient,
    ) -> Result<Response<WasiBody>> {
        let Some(comp) = self.components.get(&route.component) else {
            bail!("unknown component '{}'", route.component);
        };
        let req = std::mem::take(req);
        let req = prepare_request(req, route, client_addr)?;

        let mut wasi = WasiCtx::builder();
        // Guest output goes to the runner's stdout/stderr, a line per write (see `stdio`).
        wasi.stdout(GuestOutput::new(Target::Stdout));
        wasi.stderr(GuestOutput::new(Target::Stderr));
        for (k, v) in &comp.env {
            wasi.env(k, v);
        }
        let state = HostState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            hooks: OutboundHooks {
                app: self.clone(),
                allowed: comp.allowed_hosts.clone(),
                outbound: outbound.clone(),
            },
            kv: KvInstance {
                allowed: comp.kv_allowed.clone(),
                stores: self.stores.clone(),
            },
            vars: comp.vars.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        let (tx, rx) = oneshot::channel();
        let incoming = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, req)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let outparam = store
            .data_mut()
            .http()
            .new_response_outparam(tx)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let pre = comp.pre.clone();
        let guard = self.inflight.enter();
        // The guest runs in its own task, as in Spin's trigger-http: the response can stream
        // while the guest is still producing it, and the guest runs to its end even after the
        // response is complete or the client has gone (its writes then fail), as under Spin.
        let task = tokio::spawn(async move {
            let _guard = guard;
            let proxy = pre.instantiate_async(&mut store).await?;
            let result = proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, incoming, outparam)
                .await;
            if result.is_ok() {
                // The guest has returned: let the response go out (its connection task was
                // woken onto this worker) before tearing the instance down, which costs tens
                // of microseconds. This is after the guest's last instruction, so it moves no
                // observable point; an error result is returned at once so it is always logged.
                tokio::task::yield_now().await;
            }
            drop(store);
            result
        });

        match rx.await {
            Ok(resp) => {
                // As Spin: whatever the guest does after setting its response, a failure is
                // reported here. Shutdown waits for the report too, not only for the guest.
                let component = route.component.clone();
                let guard = self.inflight.enter();
                tokio::spawn(async move {
                    let _guard = guard;
                    match task.await {
                        Ok(Ok(())) => {}
                        Err(e) if e.is_cancelled() => {}
                        Ok(Err(e)) => {
                            eprintln!("error: component '{component}' failed after its response started: {e:#}")
                        }
                        Err(e) => eprintln!("error: component '{component}' panicked: {e}"),
                    }
                });
                match resp {
                    Ok(resp) => Ok(resp.map(|body| body.boxed_unsync())),
                    Err(code) => bail!("guest returned an error response: {code:?}"),
                }
            }
            Err(_) => match task.await {
                Ok(Ok(())) => bail!("guest failed to produce a response prior to returning"),
                Ok(Err(e)) => Err(anyhow::anyhow!("{e:#}")),
                Err(e) => bail!("guest task failed: {e}"),
            },
        }
    }

    /// Delivers a service-chaining request to `component` in-process.
    async fn handle_chained(
        self: Arc<Self>,
        component: String,
        req: Request<WasiBody>,
        outbound: OutboundClient,
    ) -> Response<WasiBody> {
        let path = req.uri().path().to_string();
        let route = RouteMatch::synthetic(&component, &path);
        self.handle(req, &route, CHAINED_CLIENT_ADDR, &outbound)
            .await
    }

    /// Whether `id` is a component this app can run.
    pub fn has_component(&self, id: &str) -> bool {
        self.components.contains_key(id)
    }
}

/// A short plain-text 500.
pub fn internal_error() -> Response<WasiBody> {
    let mut resp = Response::new(full_body("Internal Server Error\n"));
    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A complete in-memory body.
pub fn full_body(data: impl Into<Bytes>) -> WasiBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Sets the absolute URI and Spin's `spin-*` headers, as Spin's trigger-http does.
fn prepare_request(
    req: Request<WasiBody>,
    route: &RouteMatch,
    client_addr: SocketAddr,
) -> Result<Request<WasiBody>> {
    let (mut parts, body) = req.into_parts();
    // Spin never lets a caller claim to be a chaining host.
    if parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| service_chaining_target(h).is_some())
    {
        parts.headers.remove(http::header::HOST);
    }
    let host_header = parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let authority = match (&host_header, parts.uri.authority()) {
        (Some(h), _) => h.clone(),
        (None, Some(a)) => a.to_string(),
        (None, None) => "localhost".to_string(),
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path_and_query.as_str())
        .build()
        .context("request has an invalid authority")?;
    let full_url = format!(
        "http://{}{}",
        host_header.as_deref().unwrap_or("localhost"),
        path_and_query
    );
    let mut set = |name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            parts.headers.insert(n, v);
        }
    };
    set("spin-path-info", &route.path_info);
    set("spin-full-url", &full_url);
    set("spin-matched-route", &route.raw_route);
    set("spin-base-path", "/");
    set("spin-raw-component-route", &route.raw_route);
    set("spin-component-route", &route.component_route);
    set("spin-client-addr", &client_addr.to_string());
    for (name, value) in &route.params {
        set(
            &format!("spin-path-match-{}", name.to_ascii_lowercase()),
            value,
        );
    }
    Ok(Request::from_parts(parts, body))
}

/// wasi:http outgoing hooks: Spin's allowed-hosts check, chaining and self requests.
pub struct OutboundHooks {
    app: Arc<App>,
    allowed: Arc<AllowedHosts>,
    /// The serving worker's pooled client (one pool per worker thread).
    outbound: OutboundClient,
}

type SendFuture = Box<
    dyn std::future::Future<
            Output = wasmtime_wasi_http::Result<(
                Response<WasiBody>,
                Box<dyn std::future::Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for OutboundHooks {
    fn send_request(
        &mut self,
        mut request: Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn std::future::Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendFuture {
        drop(fut);
        let app = self.app.clone();
        let allowed = self.allowed.clone();
        let outbound = self.outbound.clone();
        Box::new(async move {
            let uri = request.uri().clone();
            let scheme = uri.scheme_str().unwrap_or("https").to_string();
            let host = uri.host().unwrap_or("").to_string();
            let is_self = host.is_empty() || host == "self.alt";
            if is_self {
                if !allowed.allows_relative() {
                    return Err(wasmtime_wasi_http::Error::HttpRequestDenied);
                }
                let Some(addr) = app.self_addr.get().copied() else {
                    return Err(wasmtime_wasi_http::Error::HttpRequestUriInvalid);
                };
                let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                *request.uri_mut() = Uri::builder()
                    .scheme("http")
                    .authority(addr.to_string())
                    .path_and_query(pq)
                    .build()
                    .map_err(|_| wasmtime_wasi_http::Error::HttpRequestUriInvalid)?;
                if let Ok(v) = HeaderValue::try_from(addr.to_string()) {
                    request.headers_mut().insert(http::header::HOST, v);
                }
            } else if !allowed.allows(&scheme, &host, uri.port_u16()) {
                return Err(wasmtime_wasi_http::Error::HttpRequestDenied);
            } else if let Some(target) = service_chaining_target(&host) {
                if !app.has_component(target) {
                    return Err(wasmtime_wasi_http::Error::DestinationNotFound);
                }
                let target = target.to_string();
                request.headers_mut().remove(http::header::HOST);
                let resp = app.handle_chained(target, request, outbound).await;
                let done: Box<
                    dyn std::future::Future<Output = wasmtime_wasi_http::Result<()>> + Send,
                > = Box::new(async { Ok(()) });
                return Ok((resp, done));
            }
            // Spin's pooled client: connection errors surface through the response (body).
            let resp = outbound.send(request, options).await?;
            let io: Box<dyn std::future::Future<Output = wasmtime_wasi_http::Result<()>> + Send> =
                Box::new(async { Ok(()) });
            Ok((resp, io))
        })
    }
}
