//! Test support, in one place behind one gate: compiled for this crate's unit tests
//! (`cfg(test)`) and, with the `testing` feature, for other crates' tests (the end-to-end tests
//! in `tests/` enable it as a dev-dependency). Never in the release binary: no normal dependency
//! enables the feature, and `tests/release_features.rs` checks that.
//!
//! It may use any module of the crate (it sits above them all, like test code), and no
//! production module may use it (`tests/layering.rs` enforces both).
//!
//! - [`ca`]: [`ca::TestCa`], a CA in memory issuing mesh-shaped workload certificates, and
//!   [`ca::TestCaServer`], the real CA service on loopback.
//! - [`fake_apiserver`]: an in-process Kubernetes API server (list/watch, status patches).
//! - [`hbone`]: HBONE servers and echoing applications on 127.0.0.1.
//! - [`log_lines`]: a log sink in memory for a test's tracing subscriber.
pub mod ca;
pub mod fake_apiserver;
pub mod hbone;
pub mod log_lines;
