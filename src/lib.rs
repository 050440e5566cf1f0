//! FreeRelay core: everything the gateway decides, as plain Rust with no Spin types, so it is
//! tested natively and compiled unchanged into the wasm32-wasip2 components.
//!
//! Floors, bottom up: [`wire`], [`catalog`], [`kv`] and [`error`] know nothing of each other's
//! callers; [`config`], [`auth`], [`cooldown`] and [`stats`] are typed state with pure
//! transitions; [`route`] and [`upstream`] plan and judge one request; [`api`] maps HTTP paths.

pub mod api;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod cooldown;
pub mod error;
pub mod kv;
pub mod route;
pub mod stats;
pub mod upstream;
pub mod wire;

pub use error::ApiError;
