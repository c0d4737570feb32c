//! Fuzz harnesses for vhost-user-vhdx. Each target in `fuzz_targets/` calls one `run` here, so
//! that a finding can be replayed from an ordinary test or a debugger (`cargo run --bin`).
//!
//! Every harness treats its input as untrusted the way the daemon does: nothing may panic,
//! hang or allocate without bound; only the harness's own invariants (the model) assert.

pub mod inflight_region;
pub mod log_replay;
pub mod open_image;
pub mod queue_requests;
pub mod restart;
pub mod sparse;
pub mod storage;
pub mod virtio_parse;
pub mod write_model;

/// Whether every byte of `s` is `v`. The harnesses' own code is instrumented for coverage like
/// the code under test, and a byte-by-byte loop over MiBs (every sector of the disk, every page
/// of an image) cost more than everything else: this compares 4 KiB at a time with `==` on
/// slices, a `memcmp` outside the instrumentation.
pub fn uniform(s: &[u8], v: u8) -> bool {
    let pattern = [v; 4096];
    s.chunks(4096).all(|c| c == &pattern[..c.len()])
}
