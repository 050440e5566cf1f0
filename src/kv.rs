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
    fn delete(&self, key: &str) -> KvResult<()>;
    fn exists(&self, key: &str) -> KvResult<bool>;
    /// Adds `delta` to the i64 stored at `key` (absent counts as 0) and returns the new value.
    /// Values are 8 little-endian bytes, as Spin's stores keep them.
    fn increment(&self, key: &str, delta: i64) -> KvResult<i64>;
    /// Writes `new` only if the current value is `expected` (`None`: absent); true if written.
    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> KvResult<bool>;
}

/// Decodes a counter written by [`Kv::increment`].
pub fn decode_counter(bytes: &[u8]) -> Option<i64> {
    <[u8; 8]>::try_from(bytes).ok().map(i64::from_le_bytes)
}

/// Key names. Every key the product writes is built here and described in `kv-schema/`.
pub mod keys {
    /// `stats:v1:<provider>:<field>` — i64 counter (increment).
    pub fn stat(provider: &str, field: &str) -> String {
        format!("stats:v1:{provider}:{field}")
    }

    /// `cooldown:v1:<provider>` — JSON [`crate::cooldown::Cooldown`]: skip until a time.
    pub fn cooldown(provider: &str) -> String {
        format!("cooldown:v1:{provider}")
    }
}

/// An in-memory store with the same semantics, for native tests and benchmarks.
#[derive(Debug, Default)]
pub struct MemKv {
    map: Mutex<HashMap<String, Vec<u8>>>,
}

impl MemKv {
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
            m.insert(key.to_owned(), next.to_le_bytes().to_vec());
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
}
