//! The audit of every routing decision: a route id per response, and the decision with its
//! outcome kept in the store for the tenant that made the request, in a bounded ring of slots.

use crate::budget::Tenant;
use serde::Serialize;
use serde_json::Value;

/// Slots in the ring (`route_audit_entries`): a route stays readable until about this many
/// later requests have been routed.
pub const DEFAULT_ENTRIES: u32 = 4096;

/// A route id: `rt_` and 16 hex digits; its slot is those digits modulo the ring's size.
pub fn new_id(random: u64) -> String {
    format!("rt_{random:016x}")
}

/// The slot of a route id, or `None` for something that is not one.
pub fn slot(id: &str, entries: u32) -> Option<u64> {
    let hex = id.strip_prefix("rt_").filter(|h| h.len() == 16)?;
    let n = u64::from_str_radix(hex, 16).ok()?;
    Some(n % u64::from(entries.max(1)))
}

/// `route:v1:<slot>` — JSON [`Record`]; overwritten by the next route that falls in the slot.
pub fn key(slot: u64) -> String {
    format!("route:v1:{slot}")
}

/// How a routed request ended.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Outcome {
    pub status: u16,
    /// The provider and model that answered (absent when none did).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub attempts: u32,
    pub latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<String>,
    /// `exact` or `semantic` when the cache answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'static str>,
    /// Candidates passed over or failed, in order, with why.
    pub trail: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The router component did not answer: the gateway planned locally (why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router_fallback: Option<String>,
    /// The request was sent to two candidates at once.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub hedged: bool,
}

/// Builds the stored record: the decision's audit (a JSON object: `profile`, `candidates`,
/// `policy`, `sticky`, `mode`) with the id, its owner and the outcome added — spliced as text,
/// so the audit is never parsed again.
pub fn record(
    id: &str,
    tenant: &Tenant,
    request_id: &str,
    model: &str,
    created_ms: u64,
    decision: &str,
    outcome: &Outcome,
) -> Vec<u8> {
    #[derive(Serialize)]
    struct Head<'a> {
        id: &'a str,
        object: &'static str,
        tenant: &'a str,
        request_id: &'a str,
        model_requested: &'a str,
        created_ms: u64,
        outcome: &'a Outcome,
    }
    let head = serde_json::to_vec(&Head {
        id,
        object: "freerelay.route",
        tenant: &tenant.id,
        request_id,
        model_requested: model,
        created_ms,
        outcome,
    })
    .unwrap_or_default();
    // `{head…}` + `,` + `{audit…}` without its `{`: one object.
    let audit = decision.trim();
    let mut out = head;
    match audit.strip_prefix('{').map(str::trim_start) {
        Some(rest) if rest != "}" && rest.ends_with('}') => {
            out.pop();
            out.push(b',');
            out.extend_from_slice(rest.as_bytes());
        }
        _ => {}
    }
    out
}

/// The record for `id` as the tenant may see it: `None` when the slot holds another route (or
/// nothing), or the route belongs to another tenant — the two are indistinguishable on purpose.
pub fn read(id: &str, tenant: &Tenant, stored: Option<&[u8]>) -> Option<Value> {
    let v: Value = serde_json::from_slice(stored?).ok()?;
    (v.get("id")?.as_str()? == id && v.get("tenant")?.as_str()? == tenant.id).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str) -> Tenant {
        Tenant {
            id: id.into(),
            user: None,
        }
    }

    #[test]
    fn ids_map_to_slots_and_nothing_else_does() {
        let id = new_id(0x1234);
        assert_eq!(id, "rt_0000000000001234");
        assert_eq!(slot(&id, 4096), Some(0x1234 % 4096));
        assert_eq!(slot("rt_123", 4096), None);
        assert_eq!(slot("xx_0000000000001234", 4096), None);
        assert_eq!(slot("rt_zzzzzzzzzzzzzzzz", 4096), None);
        assert_eq!(key(7), "route:v1:7");
    }

    #[test]
    fn a_record_is_read_back_only_by_its_tenant_and_id() {
        let o = Outcome {
            status: 200,
            provider: Some("groq".into()),
            attempts: 1,
            ..Outcome::default()
        };
        let rec = record(
            "rt_0000000000000001",
            &tenant("ta"),
            "fr-1",
            "auto",
            5,
            r#"{"profile": {"family": {"value": "chat"}}, "candidates": []}"#,
            &o,
        );
        let v = read("rt_0000000000000001", &tenant("ta"), Some(&rec)).unwrap();
        assert_eq!(v["outcome"]["provider"], "groq");
        assert_eq!(v["profile"]["family"]["value"], "chat");
        assert!(v["outcome"].get("hedged").is_none());
        assert!(read("rt_0000000000000001", &tenant("tb"), Some(&rec)).is_none());
        assert!(read("rt_0000000000000002", &tenant("ta"), Some(&rec)).is_none());
        assert!(read("rt_0000000000000001", &tenant("ta"), None).is_none());
        // Without a decision (the router refused), the record is the head alone.
        for empty in ["{}", "", "null"] {
            let rec = record(
                "rt_0000000000000003",
                &tenant("ta"),
                "fr-1",
                "auto",
                5,
                empty,
                &o,
            );
            let v = read("rt_0000000000000003", &tenant("ta"), Some(&rec)).unwrap();
            assert_eq!(v["outcome"]["status"], 200);
        }
    }
}
