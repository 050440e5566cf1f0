//! The one key-value abstraction: every piece of shared state goes through [`Kv`], whose key
//! layout is documented in `kv-schema/`. Components implement it over Spin's stores
//! (`fermyon:spin/key-value` + `wasi:keyvalue` atomics); tests use [`MemKv`].

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

/// A store operation that failed; the message is for logs, never for clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvError(pub String);

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key-value store: {}", self.0)
    }
}

impl std::error::Error for KvError {}

pub type KvResult<T> = Result<T, KvError>;

/// The operations the product relies on: plain reads and writes, a batched read, and the two
/// atomics (increment, compare-and-swap) that make state safe across concurrent instances.
pub trait Kv {
    fn get(&self, key: &str) -> KvResult<Option<Vec<u8>>>;
    /// Reads many keys in one host call; the result is in the order of `keys`.
    fn get_many(&self, keys: &[String]) -> KvResult<Vec<Option<Vec<u8>>>>;
    fn set(&self, key: &str, value: &[u8]) -> KvResult<()>;
    /// Writes many keys; stores with a batch call do it in one host call.
    fn set_many(&self, pairs: &[(String, Vec<u8>)]) -> KvResult<()> {
        pairs.iter().try_for_each(|(k, v)| self.set(k, v))
    }
    fn delete(&self, key: &str) -> KvResult<()>;
    fn exists(&self, key: &str) -> KvResult<bool>;
    /// Adds `delta` to the i64 stored at `key` (absent counts as 0) and returns the new value,
    /// in the store's counter encoding ([`CounterEncoding`]).
    fn increment(&self, key: &str, delta: i64) -> KvResult<i64>;
    /// Writes `new` only if the current value is `expected` (`None`: absent); true if written.
    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> KvResult<bool>;
}

/// How a store keeps the counters its `increment` writes: Spin's SQLite store as 8 little-endian
/// bytes, Spin's Redis store (`INCRBY`) as ASCII decimal. Readers accept both; a counter
/// rewritten by compare-and-swap keeps the encoding it had, so the store's own `increment` can
/// go on adding to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterEncoding {
    LittleEndian,
    Decimal,
}

impl CounterEncoding {
    /// The encoding of a stored counter. Eight bytes that are all ASCII digits (or a leading
    /// `-`) are decimal: as little-endian they would be at least 0x3030…30 ≈ 3.5e18, more than any
    /// counter FreeRelay writes (window tags stay below 2^61 until the year 2225).
    pub fn of(bytes: &[u8]) -> Option<Self> {
        let decimal = !bytes.is_empty()
            && bytes.len() <= 20
            && bytes
                .iter()
                .enumerate()
                .all(|(i, b)| b.is_ascii_digit() || (i == 0 && *b == b'-' && bytes.len() > 1));
        if decimal {
            Some(Self::Decimal)
        } else if bytes.len() == 8 {
            Some(Self::LittleEndian)
        } else {
            None
        }
    }

    pub fn encode(self, value: i64) -> Vec<u8> {
        match self {
            Self::LittleEndian => value.to_le_bytes().to_vec(),
            Self::Decimal => value.to_string().into_bytes(),
        }
    }
}

/// Decodes a counter written by [`Kv::increment`], in either store's encoding.
pub fn decode_counter(bytes: &[u8]) -> Option<i64> {
    match CounterEncoding::of(bytes)? {
        CounterEncoding::LittleEndian => <[u8; 8]>::try_from(bytes).ok().map(i64::from_le_bytes),
        CounterEncoding::Decimal => std::str::from_utf8(bytes).ok()?.parse().ok(),
    }
}

/// `value` encoded as the counter `current` is (little-endian when there is none).
pub fn encode_counter_like(current: Option<&[u8]>, value: i64) -> Vec<u8> {
    current
        .and_then(CounterEncoding::of)
        .unwrap_or(CounterEncoding::LittleEndian)
        .encode(value)
}

/// Key names. Every key the product writes is built here and described in `kv-schema/`
/// (a test checks that each builder's prefix is documented there).
pub mod keys {
    /// Every key prefix built below, for the documentation test.
    pub const PREFIXES: &[&str] = &[
        "stats:v1:",
        "cooldown:v1:",
        "cooldown:v1:bg:",
        "quota:v1:",
        "budget:v1:",
        "breaker:v1:",
        "aimd:v1:",
        "cache:v1:",
        "learn:v1:",
        "sticky:v1:",
        "route:v1:",
        "policy:v1:",
    ];

    /// `stats:v1:<scope>:<field>` — i64 counter (increment). `<scope>` is a provider id or
    /// `gateway` for requests that never reached a provider.
    pub fn stat(scope: &str, field: &str) -> String {
        format!("stats:v1:{scope}:{field}")
    }

    /// `cooldown:v1:<provider>:<key-id>` (the key, every model: a refused key, or a 429 where
    /// the provider limits per key) or `cooldown:v1:<provider>:<key-id>:<ledger>` (a 429 where it
    /// limits per model or per pool: `<ledger>` is the model id or `@<pool>`) — JSON
    /// [`crate::cooldown::Cooldown`]: skip until a time. `<key-id>` is a key's fingerprint
    /// ([`crate::config::ApiKey`]), never the key.
    pub fn cooldown(provider: &str, key_id: &str, ledger: Option<&str>) -> String {
        match ledger {
            Some(l) => format!("cooldown:v1:{provider}:{key_id}:{l}"),
            None => format!("cooldown:v1:{provider}:{key_id}"),
        }
    }

    /// `cooldown:v1:bg:<provider>:<key-id>` or `cooldown:v1:bg:<provider>:<key-id>:<ledger>` —
    /// the same JSON cool-down as [`cooldown`], written by a 429 (or a quota refusal) that a
    /// background request provoked ([`crate::quota::Class::Background`]): background requests
    /// honour it, foreground requests never read it. The class is a segment before the provider,
    /// not a suffix: a ledger is a model id, which may contain `:` and end in anything, while no
    /// provider is called `bg`.
    pub fn cooldown_bg(provider: &str, key_id: &str, ledger: Option<&str>) -> String {
        match ledger {
            Some(l) => format!("cooldown:v1:bg:{provider}:{key_id}:{l}"),
            None => format!("cooldown:v1:bg:{provider}:{key_id}"),
        }
    }

    /// `quota:v1:<provider>:<key-id>:<ledger>:<kind>` — i64 counter tagged with its window
    /// (`window × 2^36 + count`, see [`crate::quota`]). `<ledger>` is the model id, `@<pool>`, or
    /// `*` where the provider limits per key (`ledger` `None`); `<kind>` is `rpm`, `rpd`, `tpm`
    /// or `tpd`. The ledger may contain `:` (model ids do); provider, key id and kind never do.
    pub fn quota(provider: &str, key_id: &str, ledger: Option<&str>, kind: &str) -> String {
        let ledger = ledger.unwrap_or("*");
        format!("quota:v1:{provider}:{key_id}:{ledger}:{kind}")
    }

    /// `breaker:v1:<provider>:state:<model>` — JSON [`crate::breaker::State`]. The model is
    /// last (model ids contain `/` and `:`): split on the first four `:`.
    pub fn breaker_state(provider: &str, model: &str) -> String {
        format!("breaker:v1:{provider}:state:{model}")
    }

    /// `breaker:v1:<provider>:s<slot>:<model>` (successes) or `…:f<slot>:<model>` (failures) —
    /// i64 counter tagged with its bucket ([`crate::counter::LEASE`], see [`crate::breaker`]).
    pub fn breaker_outcomes(provider: &str, model: &str, failures: bool, slot: u64) -> String {
        let kind = if failures { 'f' } else { 's' };
        format!("breaker:v1:{provider}:{kind}{slot}:{model}")
    }

    /// `aimd:v1:<provider>:window` — JSON [`crate::aimd::Window`]: the allowed concurrency.
    pub fn aimd_window(provider: &str) -> String {
        format!("aimd:v1:{provider}:window")
    }

    /// `aimd:v1:<provider>:inflight:<slot>` — i64 counter of requests in flight, tagged with
    /// their lease period ([`crate::counter::LEASE`], see [`crate::aimd`]).
    pub fn aimd_in_flight(provider: &str, slot: u64) -> String {
        format!("aimd:v1:{provider}:inflight:{slot}")
    }

    /// `budget:v1:<scope>:<field>` — `<scope>` is `global`, a tenant id or `<tenant>:<user>`
    /// (pseudonyms, see [`crate::budget`]); `<field>` is `day` or `month` (money counters tagged
    /// with their window, [`crate::counter::MONEY`]) or `ewma` (JSON [`crate::budget::Ewma`]).
    pub fn budget(scope: &str, field: &str) -> String {
        format!("budget:v1:{scope}:{field}")
    }
}

/// One state change, decided by a pure transition and performed by the component at the point
/// of decision. Transitions return these instead of touching a store, so they test natively.
#[derive(Debug, Clone)]
pub enum KvOp {
    /// Plain write (last writer wins).
    Set { key: String, value: Vec<u8> },
    /// Atomic add to an i64 counter.
    Increment { key: String, delta: i64 },
    /// Writes `value` unless the stored value already ranks at least as high, by a
    /// compare-and-swap loop: concurrent writers converge on the highest rank, never regress.
    CasMax {
        key: String,
        value: Vec<u8>,
        /// Reads the rank of an encoded value; unreadable values rank lowest.
        rank: fn(&[u8]) -> Option<u64>,
    },
    /// [`KvOp::CasMax`] for a counter the store's `increment` also writes: ranks decoded values
    /// and writes `value` in the stored counter's encoding ([`CounterEncoding`]).
    CounterMax {
        key: String,
        value: i64,
        rank: fn(i64) -> Option<u64>,
    },
}

/// Equal when they would write the same thing (a `CasMax`'s rank function is not compared:
/// function addresses are not meaningful).
impl PartialEq for KvOp {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (KvOp::Set { key: a, value: x }, KvOp::Set { key: b, value: y })
            | (
                KvOp::CasMax {
                    key: a, value: x, ..
                },
                KvOp::CasMax {
                    key: b, value: y, ..
                },
            ) => a == b && x == y,
            (KvOp::Increment { key: a, delta: x }, KvOp::Increment { key: b, delta: y })
            | (
                KvOp::CounterMax {
                    key: a, value: x, ..
                },
                KvOp::CounterMax {
                    key: b, value: y, ..
                },
            ) => a == b && x == y,
            _ => false,
        }
    }
}

impl KvOp {
    pub fn key(&self) -> &str {
        match self {
            KvOp::Set { key, .. }
            | KvOp::Increment { key, .. }
            | KvOp::CasMax { key, .. }
            | KvOp::CounterMax { key, .. } => key,
        }
    }
}

/// Compare-and-swap attempts before [`cas_update`] gives up (each retry means another writer
/// changed the key in between, so progress is being made by someone).
pub const CAS_ATTEMPTS: usize = 16;

/// Read-modify-write with compare-and-swap: `f` sees the current value and returns the value to
/// store, or `None` to leave the key as it is. Retries when another writer got in between.
/// Returns whether a value was written.
pub fn cas_update(
    kv: &(impl Kv + ?Sized),
    key: &str,
    mut f: impl FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
) -> KvResult<bool> {
    for _ in 0..CAS_ATTEMPTS {
        let current = kv.get(key)?;
        let Some(new) = f(current.as_deref()) else {
            return Ok(false);
        };
        if kv.compare_and_swap(key, current.as_deref(), &new)? {
            return Ok(true);
        }
    }
    Err(KvError(format!(
        "{key}: compare-and-swap lost {CAS_ATTEMPTS} times in a row"
    )))
}

/// Performs one operation.
pub fn apply(kv: &(impl Kv + ?Sized), op: &KvOp) -> KvResult<()> {
    match op {
        KvOp::Set { key, value } => kv.set(key, value),
        KvOp::Increment { key, delta } => kv.increment(key, *delta).map(|_| ()),
        KvOp::CasMax { key, value, rank } => {
            let proposed = rank(value);
            cas_update(kv, key, |current| {
                let higher = match (current.and_then(rank), proposed) {
                    (Some(c), Some(p)) => p > c,
                    (None, _) => true,
                    (Some(_), None) => false,
                };
                higher.then(|| value.clone())
            })
            .map(|_| ())
        }
        KvOp::CounterMax { key, value, rank } => {
            let proposed = rank(*value);
            cas_update(kv, key, |current| {
                let stored = current.and_then(decode_counter);
                let higher = match (stored.and_then(rank), proposed) {
                    (Some(c), Some(p)) => p > c,
                    (None, _) => true,
                    (Some(_), None) => false,
                };
                higher.then(|| encode_counter_like(current, *value))
            })
            .map(|_| ())
        }
    }
}

/// An in-memory store with the same semantics, for native tests and benchmarks.
#[derive(Debug, Default)]
pub struct MemKv {
    map: Mutex<HashMap<String, Vec<u8>>>,
    /// Counters as ASCII decimal, as Spin's Redis store keeps them (`INCRBY`).
    decimal: bool,
}

impl MemKv {
    /// A store that keeps counters as Redis does (ASCII decimal), for testing both encodings.
    pub fn redis_like() -> Self {
        Self {
            decimal: true,
            ..Self::default()
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Vec<u8>>) -> T) -> KvResult<T> {
        let mut map = self.map.lock().map_err(|_| KvError("poisoned".into()))?;
        Ok(f(&mut map))
    }
}

impl Kv for MemKv {
    fn get(&self, key: &str) -> KvResult<Option<Vec<u8>>> {
        self.with(|m| m.get(key).cloned())
    }

    fn get_many(&self, keys: &[String]) -> KvResult<Vec<Option<Vec<u8>>>> {
        self.with(|m| keys.iter().map(|k| m.get(k).cloned()).collect())
    }

    fn set(&self, key: &str, value: &[u8]) -> KvResult<()> {
        self.with(|m| {
            m.insert(key.to_owned(), value.to_vec());
        })
    }

    fn delete(&self, key: &str) -> KvResult<()> {
        self.with(|m| {
            m.remove(key);
        })
    }

    fn exists(&self, key: &str) -> KvResult<bool> {
        self.with(|m| m.contains_key(key))
    }

    fn increment(&self, key: &str, delta: i64) -> KvResult<i64> {
        self.with(|m| {
            let current = match m.get(key) {
                None => Ok(0),
                Some(v) => {
                    decode_counter(v).ok_or_else(|| KvError(format!("{key}: not a counter")))
                }
            }?;
            let next = current.wrapping_add(delta);
            let encoding = if self.decimal {
                CounterEncoding::Decimal
            } else {
                CounterEncoding::LittleEndian
            };
            m.insert(key.to_owned(), encoding.encode(next));
            Ok(next)
        })?
    }

    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> KvResult<bool> {
        self.with(|m| {
            if m.get(key).map(Vec::as_slice) == expected {
                m.insert(key.to_owned(), new.to_vec());
                true
            } else {
                false
            }
        })
    }
}

/// A test store around [`MemKv`] whose calls a [`testing::Hook`] sees first: to count, record,
/// interfere, fail or misreport, with one pass-through implementation of [`Kv`] for them all.
#[cfg(test)]
pub(crate) mod testing {
    use super::{Kv, KvResult, MemKv};

    /// What a test store does around its calls; every method passes the call through by default.
    pub(crate) trait Hook {
        /// Before each call: `op` is `get`, `get_many`, `set`, `delete`, `exists`, `increment`
        /// or `cas`, `key` its key (the first one for `get_many`); an error fails the call.
        fn before(&self, _op: &'static str, _key: &str, _inner: &MemKv) -> KvResult<()> {
            Ok(())
        }
        /// After a write to `key` (set, increment, or a swap that wrote), with its new value.
        fn wrote(&self, _key: &str, _value: &[u8]) {}
        /// What a swap reports, given whether it wrote.
        fn reports(&self, written: bool) -> bool {
            written
        }
    }

    #[derive(Default)]
    pub(crate) struct Hooked<H> {
        pub inner: MemKv,
        pub hook: H,
    }

    impl<H> Hooked<H> {
        pub fn new(inner: MemKv, hook: H) -> Self {
            Self { inner, hook }
        }
    }

    impl<H: Hook> Hooked<H> {
        fn wrote(&self, key: &str) -> KvResult<()> {
            if let Some(v) = self.inner.get(key)? {
                self.hook.wrote(key, &v);
            }
            Ok(())
        }
    }

    impl<H: Hook> Kv for Hooked<H> {
        fn get(&self, key: &str) -> KvResult<Option<Vec<u8>>> {
            self.hook.before("get", key, &self.inner)?;
            self.inner.get(key)
        }
        fn get_many(&self, keys: &[String]) -> KvResult<Vec<Option<Vec<u8>>>> {
            let first = keys.first().map_or("", String::as_str);
            self.hook.before("get_many", first, &self.inner)?;
            self.inner.get_many(keys)
        }
        fn set(&self, key: &str, value: &[u8]) -> KvResult<()> {
            self.hook.before("set", key, &self.inner)?;
            self.inner.set(key, value)?;
            self.wrote(key)
        }
        fn delete(&self, key: &str) -> KvResult<()> {
            self.hook.before("delete", key, &self.inner)?;
            self.inner.delete(key)
        }
        fn exists(&self, key: &str) -> KvResult<bool> {
            self.hook.before("exists", key, &self.inner)?;
            self.inner.exists(key)
        }
        fn increment(&self, key: &str, delta: i64) -> KvResult<i64> {
            self.hook.before("increment", key, &self.inner)?;
            let v = self.inner.increment(key, delta)?;
            self.wrote(key)?;
            Ok(v)
        }
        fn compare_and_swap(&self, key: &str, e: Option<&[u8]>, new: &[u8]) -> KvResult<bool> {
            self.hook.before("cas", key, &self.inner)?;
            let written = self.inner.compare_and_swap(key, e, new)?;
            if written {
                self.wrote(key)?;
            }
            Ok(self.hook.reports(written))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_kv_atomics() {
        let kv = MemKv::default();
        assert_eq!(kv.increment("c", 2).unwrap(), 2);
        assert_eq!(kv.increment("c", -5).unwrap(), -3);
        assert_eq!(decode_counter(&kv.get("c").unwrap().unwrap()), Some(-3));
        assert!(kv.compare_and_swap("k", None, b"a").unwrap());
        assert!(!kv.compare_and_swap("k", None, b"b").unwrap());
        assert!(kv.compare_and_swap("k", Some(b"a"), b"b").unwrap());
        assert_eq!(kv.get("k").unwrap().as_deref(), Some(&b"b"[..]));
        kv.set("s", b"x").unwrap();
        assert!(kv.increment("s", 1).is_err());
        assert_eq!(
            kv.get_many(&["k".into(), "none".into()]).unwrap(),
            vec![Some(b"b".to_vec()), None]
        );
        kv.delete("k").unwrap();
        assert!(!kv.exists("k").unwrap());
    }

    fn rank(v: &[u8]) -> Option<u64> {
        std::str::from_utf8(v).ok()?.parse().ok()
    }

    fn cas_max(key: &str, v: u64) -> KvOp {
        KvOp::CasMax {
            key: key.into(),
            value: v.to_string().into_bytes(),
            rank,
        }
    }

    #[test]
    fn cas_max_keeps_the_highest_rank() {
        let kv = MemKv::default();
        apply(&kv, &cas_max("k", 5)).unwrap();
        apply(&kv, &cas_max("k", 3)).unwrap();
        assert_eq!(kv.get("k").unwrap().as_deref(), Some(&b"5"[..]));
        apply(&kv, &cas_max("k", 9)).unwrap();
        assert_eq!(kv.get("k").unwrap().as_deref(), Some(&b"9"[..]));
        kv.set("k", b"junk").unwrap();
        apply(&kv, &cas_max("k", 1)).unwrap();
        assert_eq!(kv.get("k").unwrap().as_deref(), Some(&b"1"[..]));
    }

    /// A store whose value changes under the caller between the read and the swap, a given
    /// number of times: the loop must re-read and decide again on the new value.
    struct Racy {
        interference: Mutex<Vec<Vec<u8>>>,
    }

    impl testing::Hook for Racy {
        fn before(&self, op: &'static str, key: &str, inner: &MemKv) -> KvResult<()> {
            let next = (op == "cas")
                .then(|| self.interference.lock().unwrap().pop())
                .flatten();
            match next {
                Some(v) => inner.set(key, &v),
                None => Ok(()),
            }
        }
    }

    #[test]
    fn cas_update_retries_and_decides_on_the_fresh_value() {
        let kv = testing::Hooked::new(
            MemKv::default(),
            Racy {
                interference: Mutex::new(vec![b"7".to_vec(), b"2".to_vec()]),
            },
        );
        // Two other writers get in (2, then 7); proposing 5 must not overwrite 7.
        apply(&kv, &cas_max("k", 5)).unwrap();
        assert_eq!(kv.get("k").unwrap().as_deref(), Some(&b"7"[..]));
        // Endless interference exhausts the attempts with an error, never a silent loss.
        let kv = testing::Hooked::new(
            MemKv::default(),
            Racy {
                interference: Mutex::new(
                    (0..=CAS_ATTEMPTS)
                        .map(|i| i.to_string().into_bytes())
                        .collect(),
                ),
            },
        );
        let mut calls = 0;
        let r = cas_update(&kv, "k", |_| {
            calls += 1;
            Some(b"x".to_vec())
        });
        assert!(r.is_err());
        assert_eq!(calls, CAS_ATTEMPTS);
    }

    #[test]
    fn concurrent_cas_max_converges_on_the_maximum() {
        let kv = std::sync::Arc::new(MemKv::default());
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let kv = kv.clone();
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        apply(&*kv, &cas_max("k", (i * 8 + t) % 1000)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(kv.get("k").unwrap().as_deref(), Some(&b"999"[..]));
    }
}
