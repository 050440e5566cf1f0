//! FreeRelay core: everything the gateway decides, as plain Rust with no Spin types, so it is
//! tested natively and compiled unchanged into the wasm32-wasip2 components.
//!
//! Floors, bottom up: [`wire`], [`catalog`], [`kv`], [`event`] and [`error`] know nothing of
//! each other's callers; [`config`], [`auth`], [`cooldown`] and [`stats`] are typed state with
//! pure transitions returning [`kv::KvOp`]s; [`upstream`] judges failures and [`adapter`] speaks
//! each wire format; [`route`] plans a request and [`attempt`] walks the plan; [`api`] maps HTTP
//! paths.

pub mod adapter;
pub mod aimd;
pub mod api;
pub mod attempt;
pub mod audit;
pub mod auth;
pub mod breaker;
pub mod budget;
pub mod cache;
pub mod catalog;
pub mod config;
pub mod context;
pub mod cooldown;
pub mod counter;
pub mod edge;
pub mod error;
pub mod event;
pub mod kv;
pub mod learn;
pub mod policy;
pub mod profile;
pub mod quota;
pub mod route;
pub mod router;
pub mod stats;
pub mod upstream;
pub mod wire;

pub use error::ApiError;
