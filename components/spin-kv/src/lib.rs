//! [`freerelay::kv::Kv`] over Spin's `wasi:keyvalue` store, batch and atomics: the only place
//! the components touch the platform's key-value store (the gateway and the router share it).

use freerelay::kv::{Kv, KvError, KvResult};
use spin_sdk::wit::wasi::keyvalue::{atomics, batch, store};

/// The `default` store, opened once per request.
pub struct SpinKv {
    bucket: store::Bucket,
}

fn err(e: store::Error) -> KvError {
    KvError(match e {
        store::Error::NoSuchStore => "no such store".into(),
        store::Error::AccessDenied => "access denied".into(),
        store::Error::Other(m) => m,
    })
}

impl SpinKv {
    pub fn open_default() -> KvResult<Self> {
        store::open("default")
            .map(|bucket| Self { bucket })
            .map_err(err)
    }

    /// A swap the host called failed: did it write all the same? Spin's Redis store ends every
    /// swap with `UNWATCH <key>`, which Redis refuses (UNWATCH takes no argument), so it reports
    /// `cas-failed` after a `MULTI/SET/EXEC` that did write. Our value in the key means the swap
    /// won (only a writer of the very same bytes at the same moment could make that wrong, and
    /// then both wanted the same state).
    fn swapped_anyway(&self, key: &str, written: &[u8]) -> KvResult<bool> {
        Ok(self.bucket.get(key).map_err(err)?.as_deref() == Some(written))
    }
}

impl Kv for SpinKv {
    fn get(&self, key: &str) -> KvResult<Option<Vec<u8>>> {
        self.bucket.get(key).map_err(err)
    }

    fn get_many(&self, keys: &[String]) -> KvResult<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // Spin's Redis store answers `get-many` with a `KEYS` command and fails: read one by one.
        let mut found = match batch::get_many(&self.bucket, keys) {
            Ok(found) => found,
            Err(_) => return keys.iter().map(|k| self.get(k)).collect(),
        };
        // Hosts may omit absent keys or reorder: map the answer back onto `keys`.
        Ok(keys
            .iter()
            .map(|k| {
                found
                    .iter()
                    .position(|(fk, _)| fk == k)
                    .and_then(|i| found.swap_remove(i).1)
            })
            .collect())
    }

    fn set(&self, key: &str, value: &[u8]) -> KvResult<()> {
        self.bucket.set(key, value).map_err(err)
    }

    fn set_many(&self, pairs: &[(String, Vec<u8>)]) -> KvResult<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        batch::set_many(&self.bucket, pairs).map_err(err)
    }

    fn delete(&self, key: &str) -> KvResult<()> {
        self.bucket.delete(key).map_err(err)
    }

    fn exists(&self, key: &str) -> KvResult<bool> {
        self.bucket.exists(key).map_err(err)
    }

    fn increment(&self, key: &str, delta: i64) -> KvResult<i64> {
        atomics::increment(&self.bucket, key, delta).map_err(err)
    }

    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, new: &[u8]) -> KvResult<bool> {
        let cas = atomics::Cas::new(&self.bucket, key).map_err(err)?;
        if cas.current().map_err(err)?.as_deref() != expected {
            return Ok(false);
        }
        match atomics::swap(cas, new) {
            Ok(()) => Ok(true),
            Err(atomics::CasError::CasFailed(_)) => self.swapped_anyway(key, new),
            Err(atomics::CasError::StoreError(e)) => Err(err(e)),
        }
    }
}
