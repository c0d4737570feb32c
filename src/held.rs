//! Requests that are done but may not complete yet: in `serve`, a request whose metadata change
//! (a first touch of a block, or a change it relies on) is not durable in the log must not be
//! seen complete by the guest, or a SIGKILL and restart could lose it (see
//! [`crate::vhdx::write::defer_metadata_waits`]).
//!
//! A queue thread runs such a request with its wait deferred, holds it here, and goes on with
//! the requests behind it, so that a batch of first writes shares one commit instead of
//! waiting for one each. Both ways of serving a queue (one request at a time in
//! [`crate::backend`], in flight in [`crate::async_requests`]) hold requests the same way.

use crate::queue::{Outcome, Popped, Queue};
use crate::requests::Requests;

/// Held requests are completed at the latest after this many others have been, so that a
/// driver that keeps the ring busy does not keep them waiting.
const HOLD_AT_MOST: usize = 64;

#[derive(Default)]
pub struct Held {
    requests: Vec<(Popped, Outcome)>,
    /// The highest WAL generation they wait for.
    generation: u64,
    /// Requests completed since the oldest of them was held.
    passed: usize,
}

impl Held {
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Holds `p` until WAL generation `generation` is durable.
    pub fn hold(&mut self, p: Popped, outcome: Outcome, generation: u64) {
        self.generation = self.generation.max(generation);
        self.requests.push((p, outcome));
    }

    /// Counts one request completed past the held ones; true once they have waited for
    /// enough of them that they should complete now.
    pub fn passed_one(&mut self) -> bool {
        if self.requests.is_empty() {
            return false;
        }
        self.passed += 1;
        self.passed >= HOLD_AT_MOST
    }

    /// Waits until the held requests' metadata is in the log, then completes them into
    /// `queue` (without signalling the driver); if it cannot be (the image is unusable after
    /// an I/O error), they fail. Returns how many went on the used ring.
    pub fn complete(&mut self, requests: &Requests, queue: &Queue) -> usize {
        if self.requests.is_empty() {
            return 0;
        }
        let result = requests.chain.leaf().wait_durable(self.generation);
        if let Err(e) = &result {
            log::error!("requests failed: their metadata could not be committed: {e}");
        }
        let mut used = 0;
        for (p, outcome) in self.requests.drain(..) {
            if result.is_err() {
                requests.fail_status(&p);
            }
            if queue.complete(p.head, outcome, false) {
                used += 1;
            }
        }
        self.generation = 0;
        self.passed = 0;
        used
    }
}
