//! Fuzz harnesses for vhost-user-vhdx. Each target in `fuzz_targets/` calls one `run` here, so
//! that a finding can be replayed from an ordinary test or a debugger (`cargo run --bin`).
//!
//! Every harness treats its input as untrusted the way the daemon does: nothing may panic,
//! hang or allocate without bound; only the harness's own invariants (the model) assert.

pub mod inflight_region;
pub mod log_replay;
pub mod open_image;
pub mod queue_requests;
pub mod sparse;
pub mod storage;
pub mod virtio_parse;
pub mod write_model;
