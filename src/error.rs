//! OpenAI-shaped errors: every failure a client sees is `{"error": {message, type, param, code}}`
//! with the matching HTTP status, because OpenAI SDKs parse exactly that shape.

use serde_json::json;

/// One client-visible failure. `kind` is OpenAI's `type` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
    pub message: String,
    /// Seconds the client should wait before retrying (sent as `Retry-After`).
    pub retry_after: Option<u64>,
    /// Every upstream attempt the request made, when all of them failed (`error.attempts`).
    /// (Boxed: errors travel in `Result`s everywhere, and stay small.)
    pub attempts: Box<[AttemptSummary]>,
}

/// One failed upstream attempt, as the client sees it in an all-failed error.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AttemptSummary {
    pub provider: String,
    pub model: String,
    /// The upstream's HTTP status, when it answered at all.
    pub status: Option<u16>,
    pub reason: String,
}

impl ApiError {
    fn new(status: u16, kind: &'static str, code: Option<&'static str>, message: String) -> Self {
        Self {
            status,
            kind,
            code,
            param: None,
            message,
            retry_after: None,
            attempts: Box::default(),
        }
    }

    /// 400: the request body is not what the API accepts.
    pub fn invalid_request(message: impl Into<String>, param: Option<&str>) -> Self {
        let mut e = Self::new(400, "invalid_request_error", None, message.into());
        e.param = param.map(str::to_owned);
        e
    }

    /// 401: no `Authorization: Bearer` header at all.
    pub fn missing_key() -> Self {
        Self::new(
            401,
            "invalid_request_error",
            Some("missing_api_key"),
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.".into(),
        )
    }

    /// 401: a key was sent but is not one of `client_keys`.
    pub fn invalid_key() -> Self {
        Self::new(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided.".into(),
        )
    }

    /// 401: the operator has not configured any client key yet.
    pub fn no_keys_configured() -> Self {
        Self::new(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            "This gateway has no client keys configured: run `freerelay keygen` and set \
             SPIN_VARIABLE_CLIENT_KEYS to the digest it prints."
                .into(),
        )
    }

    /// 404: unknown route.
    pub fn not_found(path: &str) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            Some("unknown_url"),
            format!("Unknown request URL: {path}."),
        )
    }

    /// 404: the model names nothing this gateway can serve.
    pub fn model_not_found(message: impl Into<String>) -> Self {
        let mut e = Self::new(
            404,
            "invalid_request_error",
            Some("model_not_found"),
            message.into(),
        );
        e.param = Some("model".into());
        e
    }

    /// 405: known route, wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            405,
            "invalid_request_error",
            Some("method_not_allowed"),
            format!("Method {method} is not allowed on {path}."),
        )
    }

    /// 413: the body exceeds `max_body_bytes`; raised before the body is read in full.
    pub fn too_large(limit: u64) -> Self {
        Self::new(
            413,
            "invalid_request_error",
            Some("request_too_large"),
            format!("Request body exceeds the limit of {limit} bytes."),
        )
    }

    /// 502: the upstream answered badly or not at all.
    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(
            502,
            "upstream_error",
            Some("upstream_error"),
            message.into(),
        )
    }

    /// 504: the upstream did not answer in time.
    pub fn upstream_timeout(message: impl Into<String>) -> Self {
        Self::new(
            504,
            "upstream_error",
            Some("upstream_timeout"),
            message.into(),
        )
    }

    /// 429: every candidate provider is rate limited.
    pub fn rate_limited(message: impl Into<String>, retry_after: Option<u64>) -> Self {
        let mut e = Self::new(
            429,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
            message.into(),
        );
        e.retry_after = retry_after;
        e
    }

    /// 429 `insufficient_quota`: a spend budget is spent, so paid routes are refused (free ones
    /// keep serving). The message names the budget and when it resets; `retry_after` is the wait
    /// until then (`None` for a budget of 0, which no wait helps).
    pub fn budget_exhausted(message: impl Into<String>, retry_after: Option<u64>) -> Self {
        let mut e = Self::new(
            429,
            "insufficient_quota",
            Some("insufficient_quota"),
            message.into(),
        );
        e.retry_after = retry_after;
        e
    }

    /// 503: nothing may be asked now (every candidate's circuit breaker is open, or its probe is
    /// another instance's); `Retry-After` says when one may be.
    pub fn unavailable(message: impl Into<String>, retry_after: Option<u64>) -> Self {
        let mut e = Self::new(
            503,
            "server_error",
            Some("providers_unavailable"),
            message.into(),
        );
        e.retry_after = retry_after;
        e
    }

    /// 500: a fault of the gateway itself (a store or host call failed), never of the input.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "server_error", Some("internal_error"), message.into())
    }

    /// 500: the deployment's variables are invalid. Always this fixed text: the detail (which
    /// may name or quote a variable) goes to the operator's log only.
    pub fn misconfigured() -> Self {
        Self::new(
            500,
            "server_error",
            Some("gateway_misconfigured"),
            "The gateway is misconfigured; its operator can find the cause in the gateway's log."
                .into(),
        )
    }

    /// 404: no routing decision with this id is known to the caller (another tenant's, or
    /// overwritten since: the audit keeps the last `entries` routes).
    pub fn route_not_found(id: &str, entries: u32) -> Self {
        Self::new(
            404,
            "invalid_request_error",
            Some("route_not_found"),
            format!(
                "No route `{}` is known for this client key (routes are kept for about the last \
                 {entries} requests).",
                id.chars().take(64).collect::<String>()
            ),
        )
    }

    /// The relayed status and message of an upstream 4xx that is the client's fault.
    pub fn relayed(status: u16, message: String) -> Self {
        Self::new(status, "invalid_request_error", None, message)
    }

    /// Reads back an error this gateway wrote ([`Self::body`]): how the router component's
    /// refusals reach the client unchanged. `None` for anything else.
    pub fn from_body(status: u16, body: &[u8], retry_after: Option<u64>) -> Option<Self> {
        const KINDS: &[&str] = &[
            "invalid_request_error",
            "authentication_error",
            "rate_limit_error",
            "insufficient_quota",
            "server_error",
            "upstream_error",
            "internal_error",
        ];
        const CODES: &[&str] = &[
            "gateway_misconfigured",
            "insufficient_quota",
            "internal_error",
            "invalid_api_key",
            "method_not_allowed",
            "missing_api_key",
            "model_not_found",
            "providers_unavailable",
            "rate_limit_exceeded",
            "request_too_large",
            "route_not_found",
            "unknown_url",
            "upstream_error",
            "upstream_timeout",
        ];
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let e = v.get("error")?;
        let kind = e.get("type")?.as_str()?;
        let kind = *KINDS.iter().find(|k| **k == kind)?;
        let code = match e.get("code").and_then(|c| c.as_str()) {
            Some(c) => Some(*CODES.iter().find(|k| **k == c)?),
            None => None,
        };
        let mut err = Self::new(status, kind, code, e.get("message")?.as_str()?.to_owned());
        err.param = e.get("param").and_then(|p| p.as_str()).map(str::to_owned);
        err.retry_after = retry_after;
        Some(err)
    }

    /// The JSON body: `{"error": {...}}`.
    pub fn body(&self) -> Vec<u8> {
        let mut error = json!({
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        });
        if !self.attempts.is_empty() {
            error["attempts"] = json!(self.attempts);
        }
        serde_json::to_vec(&json!({ "error": error })).unwrap_or_default()
    }

    /// The same error as one SSE event, for failures after a stream's 200 was sent.
    pub fn sse_event(&self) -> Vec<u8> {
        let mut out = b"data: ".to_vec();
        out.extend(self.body());
        out.extend(b"\n\n");
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn errors_read_back_from_their_body() {
        let e = super::ApiError::model_not_found(String::from("no such model"));
        let mut e = e;
        e.param = Some("model".into());
        let back = super::ApiError::from_body(e.status, &e.body(), Some(3)).unwrap();
        assert_eq!(back.body(), e.body());
        assert_eq!(back.retry_after, Some(3));
        assert!(super::ApiError::from_body(400, b"{}", None).is_none());
        assert!(
            super::ApiError::from_body(400, br#"{"error":{"type":"x","message":"m"}}"#, None)
                .is_none()
        );
    }

    use super::*;

    #[test]
    fn body_is_openai_shaped() {
        let e = ApiError::invalid_request("messages must be a non-empty array", Some("messages"));
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "messages");
        assert!(v["error"]["code"].is_null());
        assert_eq!(e.status, 400);
    }

    #[test]
    fn budget_exhausted_is_insufficient_quota() {
        let e = ApiError::budget_exhausted("spent", Some(60));
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "insufficient_quota");
        assert_eq!(v["error"]["code"], "insufficient_quota");
        assert_eq!(v["error"]["message"], "spent");
        assert_eq!((e.status, e.retry_after), (429, Some(60)));
    }

    #[test]
    fn sse_event_is_one_data_frame() {
        let e = ApiError::upstream("x");
        let s = String::from_utf8(e.sse_event()).unwrap();
        assert!(s.starts_with("data: {\"error\""));
        assert!(s.ends_with("\n\n"));
    }
}
