//! FreeRelay core.
