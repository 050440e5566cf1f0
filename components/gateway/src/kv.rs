//! [`freerelay::kv::Kv`] over Spin's `wasi:keyvalue` store, batch and atomics: the only place
//! the gateway touches the platform's key-value store.

use freerelay::kv::{decode_counter, encode_counter_like, Kv, KvError, KvResult};
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
            Err(atomics::CasError::CasFailed(_)) => Ok(false),
            Err(atomics::CasError::StoreError(e)) => Err(err(e)),
        }
    }

    fn swap_counter(&self, key: &str, expected: i64, new: i64) -> KvResult<bool> {
        let cas = atomics::Cas::new(&self.bucket, key).map_err(err)?;
        let current = cas.current().map_err(err)?;
        if current.as_deref().and_then(decode_counter) != Some(expected) {
            return Ok(false);
        }
        match atomics::swap(cas, &encode_counter_like(current.as_deref(), new)) {
            Ok(()) => Ok(true),
            Err(atomics::CasError::CasFailed(_)) => Ok(false),
            Err(atomics::CasError::StoreError(e)) => Err(err(e)),
        }
    }
}
