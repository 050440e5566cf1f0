//! `freerelay` runner library: everything `freerelay up` needs to run Spin HTTP components
//! with the same host interfaces as Spin, plus the `keygen` tool.

pub mod bindings;
pub mod explain;
pub mod http_client;
pub mod keygen;
pub mod kv;
pub mod manifest;
pub mod outbound;
pub mod routes;
pub mod runtime;
pub mod server;
pub mod stdio;
pub mod variables;
