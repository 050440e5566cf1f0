//! Host bindings for the Spin-specific interfaces (generated from `runner/wit`, copied from
//! spin-sdk 5.2.0), so guests link against exactly the WIT that real Spin provides.

wasmtime::component::bindgen!({
    path: "wit",
    world: "freerelay:runner/spin-host",
    imports: { default: async | trappable },
    with: {
        "fermyon:spin/key-value.store": crate::kv::host::SpinStore,
        "wasi:keyvalue/store.bucket": crate::kv::host::Bucket,
        "wasi:keyvalue/atomics.cas": crate::kv::host::Cas,
    },
});
