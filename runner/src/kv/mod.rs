//! Key-value storage: one small backend trait (SQLite, Redis), the label → backend map built
//! from `--runtime-config-file`, and the guest-facing WIT implementations.

pub mod host;
pub mod redis;
pub mod sqlite;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// A backend failure, mapped onto each WIT interface's error variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvError {
    /// The label is not a configured store.
    NoSuchStore,
    /// The component may not open this store.
    AccessDenied,
    /// Anything else (I/O, corrupt value, …).
    Other(String),
}

impl std::fmt::Display for KvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvError::NoSuchStore => f.write_str("no such store"),
            KvError::AccessDenied => f.write_str("access denied"),
            KvError::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for KvError {}

/// What a compare-and-swap expects the current value to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasExpectation {
    /// `current` was never called: Spin then writes unconditionally.
    Unconditional,
    /// `current` saw no value: the swap may only insert.
    Absent,
    /// `current` saw this value: the swap succeeds only if it is unchanged.
    Value(Vec<u8>),
}

/// A key-value backend. Methods are synchronous and called directly from the guest's host calls
/// (which, as in Spin, do not yield); a backend that may have to wait moves that wait off the
/// async executor itself with [`blocking`] (see `SqliteBackend::run`).
///
/// `store` is the store label (the `store` column of Spin's SQLite schema).
pub trait KvBackend: Send + Sync {
    /// Value of `key`, if present.
    fn get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>, KvError>;
    /// Inserts or overwrites `key`.
    fn set(&self, store: &str, key: &str, value: &[u8]) -> Result<(), KvError>;
    /// Removes `key` (absent is fine).
    fn delete(&self, store: &str, key: &str) -> Result<(), KvError>;
    /// Whether `key` exists.
    fn exists(&self, store: &str, key: &str) -> Result<bool, KvError>;
    /// All keys of the store.
    fn get_keys(&self, store: &str) -> Result<Vec<String>, KvError>;
    /// The present keys among `keys`, with values (missing keys are omitted, as in Spin).
    fn get_many(&self, store: &str, keys: &[String]) -> Result<Vec<(String, Vec<u8>)>, KvError>;
    /// Writes all pairs in one transaction.
    fn set_many(&self, store: &str, pairs: &[(String, Vec<u8>)]) -> Result<(), KvError>;
    /// Removes all `keys`.
    fn delete_many(&self, store: &str, keys: &[String]) -> Result<(), KvError>;
    /// Atomically adds `delta` to the i64 at `key` (absent = 0); returns the new value. Each
    /// backend keeps Spin's encoding for it: SQLite stores 8 little-endian bytes, Redis ASCII
    /// decimal (`INCRBY`).
    fn increment(&self, store: &str, key: &str, delta: i64) -> Result<i64, KvError>;
    /// Atomically writes `value` if the current value matches `expected`; `Ok(false)` if not.
    fn swap(
        &self,
        store: &str,
        key: &str,
        expected: &CasExpectation,
        value: &[u8],
    ) -> Result<bool, KvError>;
}

/// Runs blocking backend work without stalling other tasks on a multi-threaded runtime
/// (tokio's `block_in_place`, as Spin's SQLite store uses for every operation). On a
/// current-thread runtime — `freerelay up`'s workers — it runs inline.
pub fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// The configured stores: label → backend.
#[derive(Clone, Default)]
pub struct KvStores {
    backends: HashMap<String, Arc<dyn KvBackend>>,
    summaries: HashMap<String, String>,
}

impl KvStores {
    /// The backend for `label`, if configured.
    pub fn get(&self, label: &str) -> Option<&Arc<dyn KvBackend>> {
        self.backends.get(label)
    }

    /// Whether `label` is configured.
    pub fn is_defined(&self, label: &str) -> bool {
        self.backends.contains_key(label)
    }

    /// A human-readable description of where `label` lives.
    pub fn summary(&self, label: &str) -> Option<&str> {
        self.summaries.get(label).map(String::as_str)
    }

    /// Adds (or replaces) a store.
    pub fn insert(&mut self, label: &str, backend: Arc<dyn KvBackend>, summary: String) {
        self.backends.insert(label.to_string(), backend);
        self.summaries.insert(label.to_string(), summary);
    }

    /// Builds the stores: `default` is SQLite at `<state_dir>/sqlite_key_value.db` unless the
    /// runtime config says otherwise. A `type = "redis"` store is connected to (and `PING`ed)
    /// here, so an unreachable server fails `freerelay up` at startup.
    pub fn from_config(state_dir: &Path, runtime_config: Option<&Path>) -> Result<Self> {
        let mut stores = Self::default();
        let mut opened: HashMap<PathBuf, Arc<sqlite::SqliteBackend>> = HashMap::new();
        let mut open_sqlite = |path: PathBuf| -> Result<Arc<sqlite::SqliteBackend>> {
            if let Some(b) = opened.get(&path) {
                return Ok(b.clone());
            }
            let b = Arc::new(sqlite::SqliteBackend::open(&path)?);
            opened.insert(path, b.clone());
            Ok(b)
        };
        // Labels with the same URL share one connection pool (and, as in Spin, their keys).
        let mut connected: HashMap<String, Arc<redis::RedisBackend>> = HashMap::new();

        let mut configured: Vec<(String, StoreConfig)> = Vec::new();
        let mut config_dir = PathBuf::from(".");
        if let Some(path) = runtime_config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read runtime config {}", path.display()))?;
            let rc: RuntimeConfig = toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("invalid runtime config {}: {e}", path.display()))?;
            configured = rc.key_value_store.into_iter().collect();
            config_dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf();
        }
        if !configured.iter().any(|(l, _)| l == "default") {
            let path = state_dir.join("sqlite_key_value.db");
            let b = open_sqlite(path.clone())?;
            stores.insert("default", b, format!("\"{}\"", path.display()));
        }
        for (label, cfg) in configured {
            match cfg {
                StoreConfig::Spin { path } => {
                    let path = match path {
                        Some(p) if p.is_absolute() => p,
                        Some(p) => config_dir.join(p),
                        None => state_dir.join("sqlite_key_value.db"),
                    };
                    let b = open_sqlite(path.clone())?;
                    stores.insert(&label, b, format!("\"{}\"", path.display()));
                }
                StoreConfig::Redis { url } => {
                    let b = match connected.get(&url) {
                        Some(b) => b.clone(),
                        None => {
                            let b = Arc::new(
                                redis::RedisBackend::connect(&url)
                                    .map_err(|e| anyhow::anyhow!("key_value_store.{label}: {e}"))?,
                            );
                            connected.insert(url, b.clone());
                            b
                        }
                    };
                    let summary = format!("redis \"{}\"", b.display_url());
                    stores.insert(&label, b, summary);
                }
                StoreConfig::Other => bail!(
                    "key_value_store.{label}: unsupported type (freerelay up supports type = \"spin\" and type = \"redis\")"
                ),
            }
        }
        Ok(stores)
    }
}

#[derive(Deserialize, Default)]
struct RuntimeConfig {
    #[serde(default)]
    key_value_store: HashMap<String, StoreConfig>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StoreConfig {
    Spin {
        #[serde(default)]
        path: Option<PathBuf>,
    },
    Redis {
        url: String,
    },
    #[serde(other)]
    Other,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_store_is_sqlite_in_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let stores = KvStores::from_config(dir.path(), None).unwrap();
        assert!(stores.is_defined("default") && !stores.is_defined("other"));
        stores
            .get("default")
            .unwrap()
            .set("default", "k", b"v")
            .unwrap();
        assert!(dir.path().join("sqlite_key_value.db").exists());
    }

    #[test]
    fn runtime_config_spin_path() {
        let dir = tempfile::tempdir().unwrap();
        let rc = dir.path().join("rc.toml");
        std::fs::write(
            &rc,
            "[key_value_store.default]\ntype = \"spin\"\npath = \"custom.db\"\n[key_value_store.extra]\ntype = \"spin\"\npath = \"custom.db\"\n",
        )
        .unwrap();
        let stores = KvStores::from_config(&dir.path().join("state"), Some(&rc)).unwrap();
        assert!(stores.is_defined("extra"));
        stores
            .get("extra")
            .unwrap()
            .set("extra", "k", b"v")
            .unwrap();
        assert!(dir.path().join("custom.db").exists());
        assert!(!dir
            .path()
            .join("state")
            .join("sqlite_key_value.db")
            .exists());
    }

    #[test]
    fn runtime_config_parses_redis_stores() {
        let rc: RuntimeConfig = toml::from_str(
            "[key_value_store.default]\ntype = \"redis\"\nurl = \"redis://127.0.0.1:6390\"\n\
             [key_value_store.cache]\ntype = \"redis\"\nurl = \"redis://:pw@cache:6379/2\"\n\
             [key_value_store.odd]\ntype = \"azure_cosmos\"\n",
        )
        .unwrap();
        assert!(matches!(
            &rc.key_value_store["default"],
            StoreConfig::Redis { url } if url == "redis://127.0.0.1:6390"
        ));
        assert!(matches!(
            &rc.key_value_store["cache"],
            StoreConfig::Redis { url } if url == "redis://:pw@cache:6379/2"
        ));
        assert!(matches!(&rc.key_value_store["odd"], StoreConfig::Other));
        // A redis store needs its URL.
        assert!(
            toml::from_str::<RuntimeConfig>("[key_value_store.default]\ntype = \"redis\"\n")
                .is_err()
        );
    }

    /// A loopback port nothing listens on.
    fn closed_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    fn from_config_error(rc_text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let rc = dir.path().join("rc.toml");
        std::fs::write(&rc, rc_text).unwrap();
        KvStores::from_config(dir.path(), Some(&rc))
            .err()
            .expect("from_config should fail")
            .to_string()
    }

    #[test]
    fn unreachable_redis_fails_at_startup_without_showing_the_password() {
        let port = closed_port();
        let err = from_config_error(&format!(
            "[key_value_store.default]\ntype = \"redis\"\nurl = \"redis://:s3cret@127.0.0.1:{port}\"\n"
        ));
        assert!(
            err.starts_with(&format!(
                "key_value_store.default: cannot reach Redis at redis://127.0.0.1:{port}: "
            )),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn invalid_redis_urls_and_types_are_named() {
        let err = from_config_error(
            "[key_value_store.default]\ntype = \"redis\"\nurl = \"http://u:s3cret@example.com\"\n",
        );
        assert!(
            err.starts_with("key_value_store.default: invalid Redis URL http://example.com"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        let err = from_config_error(
            "[key_value_store.default]\ntype = \"redis\"\nurl = \"rediss://example.com\"\n",
        );
        assert!(err.contains("TLS (rediss://) is not supported"), "{err}");
        let err = from_config_error("[key_value_store.x]\ntype = \"azure_cosmos\"\n");
        assert!(err.contains("key_value_store.x: unsupported type"), "{err}");
    }
}
