//! Helper threads that let one queue's batch of large reads use more than one core.
//!
//! Each queue is served by one thread. For small requests that
//! is right: the kernel's page-cache copy of a 4 KiB read costs less than waking another
//! thread would. A batch of large reads is different: the copy is nearly the whole cost (a
//! perf profile of 1 MiB reads shows ~90% in the kernel's `copy_page_to_iter`), and one
//! thread copies at the speed of one core, where qemu-storage-daemon's thread pool uses them
//! all. So a queue thread that pops a large read shares the batch: helpers take requests from
//! it while the queue thread does too, and the queue thread returns only when every request
//! of the batch is done. Requests a helper runs are in flight like any other: they were popped
//! through the queue's in-flight record and are completed through it, so stopping a queue
//! (GET_VRING_BASE, disable) waits for them too ([`crate::queue::Queue::stop`]); the pool itself
//! knows nothing of queues. (Large writes gain nothing: see `LARGE_READ` in the backend.)
//!
//! The helpers hold nothing of the device between batches: when the pool is dropped they exit.
//! They take no signals.

use std::collections::VecDeque;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

type Job = Arc<dyn Work>;

/// A batch a helper can take requests from.
trait Work: Send + Sync {
    fn work(&self);
}

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Job>,
    stopping: bool,
}

#[derive(Default)]
struct Shared {
    jobs: Mutex<Jobs>,
    ready: Condvar,
}

pub struct HelperPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Locks, ignoring poisoning: the data behind these locks stays consistent whatever panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl HelperPool {
    /// Starts `n` helper threads (0: every batch runs on its queue thread alone).
    pub fn new(n: usize) -> io::Result<HelperPool> {
        let shared = Arc::new(Shared::default());
        let mut pool = HelperPool {
            shared,
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let shared = Arc::clone(&pool.shared);
            let t = std::thread::Builder::new()
                .name(format!("io-helper-{i}"))
                .spawn(move || helper_loop(&shared))?;
            pool.threads.push(t);
        }
        Ok(pool)
    }

    /// The number of helper threads.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Offers `items` to the helpers (as many as there are items beyond the first) and
    /// returns at once; the caller should [`Running::work`] on them too, then
    /// [`Running::wait`] for the last to finish.
    pub fn start<T, F>(&self, items: VecDeque<T>, run: F) -> Running<T, F>
    where
        T: Send + 'static,
        F: Fn(T) + Send + Sync + 'static,
    {
        let helpers = self.len().min(items.len().saturating_sub(1));
        let batch = Arc::new(Batch {
            left: Mutex::new(items.len()),
            items: Mutex::new(items),
            done: Condvar::new(),
            run,
        });
        if helpers > 0 {
            let mut jobs = lock(&self.shared.jobs);
            for _ in 0..helpers {
                jobs.queue.push_back(Arc::clone(&batch) as Job);
            }
            drop(jobs);
            if helpers == 1 {
                self.shared.ready.notify_one();
            } else {
                self.shared.ready.notify_all();
            }
        }
        Running { batch }
    }
}

/// A batch offered to the helpers.
pub struct Running<T, F> {
    batch: Arc<Batch<T, F>>,
}

impl<T: Send, F: Fn(T) + Send + Sync> Running<T, F> {
    /// Takes and runs items until none are left to take (others may still be running).
    pub fn work(&self) {
        self.batch.work();
    }

    /// Waits until every item has finished.
    pub fn wait(self) {
        let mut left = lock(&self.batch.left);
        while *left > 0 {
            left = self
                .batch
                .done
                .wait(left)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for HelperPool {
    fn drop(&mut self) {
        lock(&self.shared.jobs).stopping = true;
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn helper_loop(shared: &Shared) {
    // Signals are for the daemon's signal thread: a SIGTERM delivered here would end the
    // process before the image is closed.
    crate::guest_memory::block_async_signals();
    // Helpers start after the sandbox is entered (src/cli/serve.rs).
    crate::sandbox::ThreadKind::Helper.confine();
    loop {
        let job = {
            let mut jobs = lock(&shared.jobs);
            loop {
                if jobs.stopping {
                    return;
                }
                if let Some(job) = jobs.queue.pop_front() {
                    break job;
                }
                jobs = shared
                    .ready
                    .wait(jobs)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        job.work();
    }
}

struct Batch<T, F> {
    items: Mutex<VecDeque<T>>,
    /// Items not yet finished (taken or not).
    left: Mutex<usize>,
    done: Condvar,
    run: F,
}

impl<T: Send, F: Fn(T) + Send + Sync> Work for Batch<T, F> {
    /// Takes and runs items until none are left to take.
    fn work(&self) {
        loop {
            let Some(item) = lock(&self.items).pop_front() else {
                return;
            };
            // A panic must not leave the queue thread waiting for ever: the item counts as
            // finished either way, and the helper lives on for the next batch.
            let _ = catch_unwind(AssertUnwindSafe(|| (self.run)(item)));
            let mut left = lock(&self.left);
            *left -= 1;
            if *left == 0 {
                self.done.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `run` on every item, here and on the helpers, and waits for all: what the backend
    /// does with one batch.
    fn run_all<T, F>(pool: &HelperPool, items: VecDeque<T>, run: F)
    where
        T: Send + 'static,
        F: Fn(T) + Send + Sync + 'static,
    {
        let running = pool.start(items, run);
        running.work();
        running.wait();
    }
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn every_item_runs_once_and_run_all_waits_for_them() {
        let pool = HelperPool::new(3).unwrap();
        for round in 0..50 {
            let seen = Arc::new((0..40).map(|_| AtomicUsize::new(0)).collect::<Vec<_>>());
            let s = Arc::clone(&seen);
            run_all(&pool, (0..40usize).collect(), move |i| {
                if i % 7 == round % 7 {
                    std::thread::sleep(Duration::from_micros(200));
                }
                s[i].fetch_add(1, Ordering::SeqCst);
            });
            for (i, n) in seen.iter().enumerate() {
                assert_eq!(n.load(Ordering::SeqCst), 1, "item {i} in round {round}");
            }
        }
    }

    #[test]
    fn helpers_share_the_work() {
        let pool = HelperPool::new(1).unwrap();
        let threads = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let t = Arc::clone(&threads);
        run_all(&pool, (0..8).collect(), move |_: i32| {
            lock(&t).insert(std::thread::current().id());
            std::thread::sleep(Duration::from_millis(20));
        });
        assert_eq!(
            lock(&threads).len(),
            2,
            "the queue thread and the helper both ran items"
        );
    }

    #[test]
    fn a_panicking_item_does_not_hang_the_batch_or_kill_the_helper() {
        let pool = HelperPool::new(1).unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let r = Arc::clone(&ran);
            run_all(&pool, (0..6).collect(), move |i: i32| {
                r.fetch_add(1, Ordering::SeqCst);
                if i == 2 {
                    panic!("item {i}");
                }
            });
        }
        assert_eq!(ran.load(Ordering::SeqCst), 18);
    }

    #[test]
    fn a_second_batch_can_start_before_the_first_is_done() {
        let pool = HelperPool::new(2).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let d = Arc::clone(&done);
        let slow = move |_: i32| {
            std::thread::sleep(Duration::from_millis(5));
            d.fetch_add(1, Ordering::SeqCst);
        };
        let first = pool.start((0..5).collect(), slow.clone());
        first.work();
        let second = pool.start((0..5).collect(), slow);
        second.work();
        first.wait();
        second.wait();
        assert_eq!(done.load(Ordering::SeqCst), 10);
    }

    #[test]
    fn no_helpers_runs_everything_on_the_caller() {
        let pool = HelperPool::new(0).unwrap();
        let me = std::thread::current().id();
        let ran = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&ran);
        run_all(&pool, (0..5).collect(), move |_: i32| {
            assert_eq!(std::thread::current().id(), me);
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(ran.load(Ordering::SeqCst), 5);
    }
}
