//! Guest-facing key-value APIs: `fermyon:spin/key-value@2.0.0` and
//! `wasi:keyvalue@0.2.0-draft2` (store, atomics, batch), with Spin's access rules and errors.

use std::collections::HashSet;
use std::sync::Arc;

use wasmtime::component::Resource;

use super::{CasExpectation, KvBackend, KvError, KvStores};
use crate::bindings::fermyon::spin::key_value as spin_kv;
use crate::bindings::wasi::keyvalue::{atomics, batch, store as wasi_kv};
use crate::runtime::HostState;

/// Per-instance key-value state: which labels this component may open, and the stores.
#[derive(Clone)]
pub struct KvInstance {
    /// The component's `key_value_stores`.
    pub allowed: Arc<HashSet<String>>,
    /// All configured stores.
    pub stores: Arc<KvStores>,
}

/// An open store handle (`fermyon:spin/key-value.store`).
pub struct SpinStore {
    label: String,
    backend: Arc<dyn KvBackend>,
}

/// An open bucket handle (`wasi:keyvalue/store.bucket`).
pub struct Bucket {
    label: String,
    backend: Arc<dyn KvBackend>,
}

/// A compare-and-swap handle (`wasi:keyvalue/atomics.cas`).
pub struct Cas {
    label: String,
    key: String,
    backend: Arc<dyn KvBackend>,
    expected: CasExpectation,
}

impl KvInstance {
    /// Spin's open rule: not listed → access-denied; listed but not configured → no-such-store.
    fn open(&self, label: &str) -> Result<Arc<dyn KvBackend>, KvError> {
        if !self.allowed.contains(label) {
            return Err(KvError::AccessDenied);
        }
        self.stores.get(label).cloned().ok_or(KvError::NoSuchStore)
    }
}

fn to_spin(e: KvError) -> spin_kv::Error {
    match e {
        KvError::NoSuchStore => spin_kv::Error::NoSuchStore,
        KvError::AccessDenied => spin_kv::Error::AccessDenied,
        KvError::Other(m) => {
            eprintln!("key-value error: {m}");
            spin_kv::Error::Other(m)
        }
    }
}

fn to_wasi(e: KvError) -> wasi_kv::Error {
    match e {
        KvError::NoSuchStore => wasi_kv::Error::NoSuchStore,
        KvError::AccessDenied => wasi_kv::Error::AccessDenied,
        KvError::Other(m) => {
            eprintln!("key-value error: {m}");
            wasi_kv::Error::Other(m)
        }
    }
}

type Trap<T> = wasmtime::Result<T>;

impl HostState {
    fn spin_store(&self, r: &Resource<SpinStore>) -> Trap<(String, Arc<dyn KvBackend>)> {
        let s = self.table.get(r)?;
        Ok((s.label.clone(), s.backend.clone()))
    }

    fn bucket(&self, r: &Resource<Bucket>) -> Trap<(String, Arc<dyn KvBackend>)> {
        let b = self.table.get(r)?;
        Ok((b.label.clone(), b.backend.clone()))
    }

    /// A new CAS handle whose expectation is the key's current value.
    fn fresh_cas(
        &mut self,
        label: String,
        key: String,
        backend: Arc<dyn KvBackend>,
    ) -> Trap<Result<Resource<Cas>, KvError>> {
        let current = match backend.get(&label, &key) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let expected = match current {
            Some(v) => CasExpectation::Value(v),
            None => CasExpectation::Absent,
        };
        Ok(Ok(self.table.push(Cas {
            label,
            key,
            backend,
            expected,
        })?))
    }
}

impl spin_kv::Host for HostState {}

impl spin_kv::HostStore for HostState {
    async fn open(&mut self, label: String) -> Trap<Result<Resource<SpinStore>, spin_kv::Error>> {
        match self.kv.open(&label) {
            Ok(backend) => Ok(Ok(self.table.push(SpinStore { label, backend })?)),
            Err(e) => Ok(Err(to_spin(e))),
        }
    }

    async fn get(
        &mut self,
        s: Resource<SpinStore>,
        key: String,
    ) -> Trap<Result<Option<Vec<u8>>, spin_kv::Error>> {
        let (label, b) = self.spin_store(&s)?;
        Ok(b.get(&label, &key).map_err(to_spin))
    }

    async fn set(
        &mut self,
        s: Resource<SpinStore>,
        key: String,
        value: Vec<u8>,
    ) -> Trap<Result<(), spin_kv::Error>> {
        let (label, b) = self.spin_store(&s)?;
        Ok(b.set(&label, &key, &value).map_err(to_spin))
    }

    async fn delete(
        &mut self,
        s: Resource<SpinStore>,
        key: String,
    ) -> Trap<Result<(), spin_kv::Error>> {
        let (label, b) = self.spin_store(&s)?;
        Ok(b.delete(&label, &key).map_err(to_spin))
    }

    async fn exists(
        &mut self,
        s: Resource<SpinStore>,
        key: String,
    ) -> Trap<Result<bool, spin_kv::Error>> {
        let (label, b) = self.spin_store(&s)?;
        Ok(b.exists(&label, &key).map_err(to_spin))
    }

    async fn get_keys(
        &mut self,
        s: Resource<SpinStore>,
    ) -> Trap<Result<Vec<String>, spin_kv::Error>> {
        let (label, b) = self.spin_store(&s)?;
        Ok(b.get_keys(&label).map_err(to_spin))
    }

    async fn drop(&mut self, s: Resource<SpinStore>) -> Trap<()> {
        self.table.delete(s)?;
        Ok(())
    }
}

impl wasi_kv::Host for HostState {
    async fn open(&mut self, identifier: String) -> Trap<Result<Resource<Bucket>, wasi_kv::Error>> {
        match self.kv.open(&identifier) {
            Ok(backend) => Ok(Ok(self.table.push(Bucket {
                label: identifier,
                backend,
            })?)),
            Err(e) => Ok(Err(to_wasi(e))),
        }
    }
}

impl wasi_kv::HostBucket for HostState {
    async fn get(
        &mut self,
        b: Resource<Bucket>,
        key: String,
    ) -> Trap<Result<Option<Vec<u8>>, wasi_kv::Error>> {
        let (label, be) = self.bucket(&b)?;
        Ok(be.get(&label, &key).map_err(to_wasi))
    }

    async fn set(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Trap<Result<(), wasi_kv::Error>> {
        let (label, be) = self.bucket(&b)?;
        Ok(be.set(&label, &key, &value).map_err(to_wasi))
    }

    async fn delete(
        &mut self,
        b: Resource<Bucket>,
        key: String,
    ) -> Trap<Result<(), wasi_kv::Error>> {
        let (label, be) = self.bucket(&b)?;
        Ok(be.delete(&label, &key).map_err(to_wasi))
    }

    async fn exists(
        &mut self,
        b: Resource<Bucket>,
        key: String,
    ) -> Trap<Result<bool, wasi_kv::Error>> {
        let (label, be) = self.bucket(&b)?;
        Ok(be.exists(&label, &key).map_err(to_wasi))
    }

    async fn list_keys(
        &mut self,
        b: Resource<Bucket>,
        cursor: Option<String>,
    ) -> Trap<Result<wasi_kv::KeyResponse, wasi_kv::Error>> {
        if cursor.is_some() {
            return Ok(Err(wasi_kv::Error::Other(
                "list_keys: cursor not supported".to_string(),
            )));
        }
        let (label, be) = self.bucket(&b)?;
        Ok(be
            .get_keys(&label)
            .map(|keys| wasi_kv::KeyResponse { keys, cursor: None })
            .map_err(to_wasi))
    }

    async fn drop(&mut self, b: Resource<Bucket>) -> Trap<()> {
        self.table.delete(b)?;
        Ok(())
    }
}

impl batch::Host for HostState {
    async fn get_many(
        &mut self,
        b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Trap<Result<Vec<(String, Option<Vec<u8>>)>, wasi_kv::Error>> {
        let (label, be) = self.bucket(&b)?;
        if keys.is_empty() {
            return Ok(Ok(Vec::new()));
        }
        Ok(be
            .get_many(&label, &keys)
            .map(|pairs| pairs.into_iter().map(|(k, v)| (k, Some(v))).collect())
            .map_err(to_wasi))
    }

    async fn set_many(
        &mut self,
        b: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> Trap<Result<(), wasi_kv::Error>> {
        let (label, be) = self.bucket(&b)?;
        if key_values.is_empty() {
            return Ok(Ok(()));
        }
        Ok(be.set_many(&label, &key_values).map_err(to_wasi))
    }

    async fn delete_many(
        &mut self,
        b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Trap<Result<(), wasi_kv::Error>> {
        let (label, be) = self.bucket(&b)?;
        if keys.is_empty() {
            return Ok(Ok(()));
        }
        Ok(be.delete_many(&label, &keys).map_err(to_wasi))
    }
}

impl atomics::Host for HostState {
    async fn increment(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        delta: i64,
    ) -> Trap<Result<i64, wasi_kv::Error>> {
        let (label, be) = self.bucket(&b)?;
        Ok(be.increment(&label, &key, delta).map_err(to_wasi))
    }

    async fn swap(
        &mut self,
        c: Resource<Cas>,
        value: Vec<u8>,
    ) -> Trap<Result<(), atomics::CasError>> {
        let cas = self.table.delete(c)?;
        match cas
            .backend
            .swap(&cas.label, &cas.key, &cas.expected, &value)
        {
            Ok(true) => Ok(Ok(())),
            // Spin answers a lost race with a fresh handle that has already read the current value.
            Ok(false) => match self.fresh_cas(cas.label, cas.key, cas.backend)? {
                Ok(fresh) => Ok(Err(atomics::CasError::CasFailed(fresh))),
                Err(e) => Ok(Err(atomics::CasError::StoreError(to_wasi(e)))),
            },
            Err(e) => Ok(Err(atomics::CasError::StoreError(to_wasi(e)))),
        }
    }
}

impl atomics::HostCas for HostState {
    async fn new(
        &mut self,
        b: Resource<Bucket>,
        key: String,
    ) -> Trap<Result<Resource<Cas>, wasi_kv::Error>> {
        let (label, backend) = self.bucket(&b)?;
        // As in Spin, `new` does not read: until `current` is called a swap writes unconditionally.
        Ok(Ok(self.table.push(Cas {
            label,
            key,
            backend,
            expected: CasExpectation::Unconditional,
        })?))
    }

    async fn current(&mut self, c: Resource<Cas>) -> Trap<Result<Option<Vec<u8>>, wasi_kv::Error>> {
        let (label, key, backend) = {
            let cas = self.table.get(&c)?;
            (cas.label.clone(), cas.key.clone(), cas.backend.clone())
        };
        let value = match backend.get(&label, &key) {
            Ok(v) => v,
            Err(e) => return Ok(Err(to_wasi(e))),
        };
        self.table.get_mut(&c)?.expected = match &value {
            Some(v) => CasExpectation::Value(v.clone()),
            None => CasExpectation::Absent,
        };
        Ok(Ok(value))
    }

    async fn drop(&mut self, c: Resource<Cas>) -> Trap<()> {
        self.table.delete(c)?;
        Ok(())
    }
}
