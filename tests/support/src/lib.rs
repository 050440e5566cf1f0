//! FreeRelay test support.
//!
//! - [`mock`]: mock providers that speak real wire formats ([`wire`]) with scripted misbehaviour;
//!   binary `freerelay-mock`.
//! - [`load`]: a keep-alive load generator for loopback targets; binary `freerelay-load`.
//! - [`client`]: the small HTTP/1.1 client both use, also handy in tests.

pub mod client;
pub mod load;
pub mod mock;
pub mod wire;

pub use mock::{Behaviour, Finish, MockConfig, MockHandle, MockProvider, RecordedRequest, Rule};
