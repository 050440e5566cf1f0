//! FreeRelay's profiler and router as a private Spin component: the gateway posts a chat
//! request's body with its facts (`x-freerelay-facts`) to `http://router.spin.internal/route`
//! and gets the decision back as JSON. A thin shell over `freerelay::router`: one batched read,
//! no writes (outcomes are recorded by the gateway once it knows them).

use freerelay::config::Config;
use freerelay::error::ApiError;
use freerelay::kv::Kv;
use freerelay::router::{Facts, Router};
use freerelay::wire::openai::ChatRequest;
use freerelay_spin_kv::SpinKv;
use spin_sdk::http::{Method, Request, Response};
use spin_sdk::http_component;
use std::collections::HashMap;

/// Marks an answer that is the router's decision (a plan, or the client's error), as opposed
/// to a failure of the router itself, after which the gateway plans locally.
const DECIDED: &str = "x-freerelay-router";

#[http_component]
fn handle(req: Request) -> Response {
    if *req.method() != Method::Post || req.path() != "/route" {
        return failure(404, "the router answers POST /route only");
    }
    let Some(facts) = req
        .header("x-freerelay-facts")
        .and_then(|v| v.as_str())
        .and_then(|v| serde_json::from_str::<Facts>(v).ok())
    else {
        return failure(400, "missing or malformed x-freerelay-facts");
    };
    let vars: HashMap<String, String> = match spin_sdk::wit::wasi::config::store::get_all() {
        Ok(all) => all.into_iter().collect(),
        Err(e) => return failure(500, &format!("variables: {e:?}")),
    };
    let config = match Config::from_vars(|n| vars.get(n).cloned()) {
        Ok(c) => c,
        Err(e) => return failure(500, &format!("configuration: {}", e.detail)),
    };
    let request = match ChatRequest::parse(req.body()) {
        Ok(r) => r,
        Err(e) => return decided_error(&e),
    };
    let router = match Router::new(&config, &request, &facts) {
        Ok(r) => r,
        Err(e) => return decided_error(&e),
    };
    // State is best effort, as in the gateway: without it the priors decide.
    let values = SpinKv::open_default()
        .and_then(|kv| kv.get_many(router.keys()))
        .unwrap_or_default();
    match router.decide(&values) {
        Ok(d) => Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .header(DECIDED, "plan")
            .body(serde_json::to_vec(&d).unwrap_or_default())
            .build(),
        Err(e) => decided_error(&e),
    }
}

fn decided_error(e: &ApiError) -> Response {
    let mut b = Response::builder();
    b.status(e.status)
        .header("content-type", "application/json")
        .header(DECIDED, "error");
    if let Some(s) = e.retry_after {
        b.header("retry-after", s.to_string());
    }
    b.body(e.body()).build()
}

fn failure(status: u16, why: &str) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(why.as_bytes().to_vec())
        .build()
}
