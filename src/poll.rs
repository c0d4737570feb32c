//! Adaptive polling (`--poll-us`): after serving, a queue thread keeps looking at its avail ring
//! and its completed I/O for a short window before it sleeps in epoll, so that a request or a
//! completion that arrives within the window costs neither a kick (a syscall in the driver's
//! VMM and an eventfd wake-up here) nor the thread's own sleep and wake-up, which on a busy
//! host is most of a small request's latency.
//!
//! The window adapts to what the thread finds, in the way QEMU's event loop sizes its polling
//! (util/aio-posix.c): each time the thread had to sleep and was woken by I/O (a kick or a
//! completion), the time since it finished serving says what polling would have gained. Woken
//! within the largest window: a longer window would have caught it, so the window doubles
//! (from [`START`]), up to the largest. Woken after the largest window: polling is wasted on
//! this load, so the window halves, down to 0 below [`START`]. Polling that finds work keeps
//! the window as it is.
//!
//! An idle device costs nothing: polling only ever follows a batch the thread served, and at
//! most one window of it; then the thread sleeps without a timeout. A window of 0 (the
//! largest set to 0, or shrunk there) never reads the clock.

use std::time::{Duration, Instant};

/// The smallest window polling starts from when it grows from 0.
pub const START: Duration = Duration::from_micros(4);

/// The default largest window, in microseconds (see the README's "Serving").
pub const DEFAULT_POLL_US: u32 = 32;

/// One queue thread's polling window.
#[derive(Debug, Clone)]
pub struct AdaptivePoll {
    max_ns: u64,
    window_ns: u64,
}

impl AdaptivePoll {
    /// Polling for at most `max` at a time (zero: never).
    pub fn new(max: Duration) -> AdaptivePoll {
        AdaptivePoll {
            max_ns: u64::try_from(max.as_nanos()).unwrap_or(u64::MAX),
            window_ns: 0,
        }
    }

    /// The current window.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns)
    }

    fn start_ns(&self) -> u64 {
        (START.as_nanos() as u64).min(self.max_ns)
    }

    /// The thread has finished serving: the moment its idle time starts (none when polling
    /// is off, so that the clock is not even read).
    pub fn start(&self) -> Option<Instant> {
        (self.max_ns > 0).then(Instant::now)
    }

    /// Calls `ready` until it says there is work (true) or the window since `since` is over
    /// (false).
    pub fn poll(&mut self, since: Option<Instant>, mut ready: impl FnMut() -> bool) -> bool {
        let Some(since) = since else {
            return false;
        };
        if self.window_ns == 0 {
            return false;
        }
        let window = self.window();
        loop {
            if ready() {
                return true;
            }
            if since.elapsed() >= window {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// The thread slept and was woken by I/O; it had been idle since `since`.
    pub fn woken(&mut self, since: Option<Instant>) {
        if let Some(since) = since {
            self.adjust(since.elapsed());
        }
    }

    /// Sizes the window after `idle` passed between the end of serving and the next I/O.
    pub fn adjust(&mut self, idle: Duration) {
        let idle = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
        if self.max_ns == 0 || idle <= self.window_ns {
            return;
        }
        if idle > self.max_ns {
            self.window_ns /= 2;
            if self.window_ns < self.start_ns() {
                self.window_ns = 0;
            }
        } else {
            self.window_ns = (self.window_ns * 2).max(self.start_ns()).min(self.max_ns);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn off_never_polls_nor_grows() {
        let mut p = AdaptivePoll::new(Duration::ZERO);
        assert!(p.start().is_none());
        p.adjust(us(1));
        assert_eq!(p.window(), Duration::ZERO);
        let mut calls = 0;
        assert!(!p.poll(Some(Instant::now()), || {
            calls += 1;
            true
        }));
        assert_eq!(calls, 0);
    }

    #[test]
    fn grows_on_short_sleeps_up_to_the_largest() {
        let mut p = AdaptivePoll::new(us(32));
        p.adjust(us(10));
        assert_eq!(p.window(), START);
        for _ in 0..10 {
            p.adjust(us(30));
        }
        assert_eq!(p.window(), us(32));
        // A sleep inside the window (polling should have caught it) changes nothing.
        p.adjust(us(20));
        assert_eq!(p.window(), us(32));
    }

    #[test]
    fn shrinks_to_zero_on_long_sleeps() {
        let mut p = AdaptivePoll::new(us(32));
        for _ in 0..10 {
            p.adjust(us(30));
        }
        let mut steps = 0;
        while p.window() > Duration::ZERO {
            p.adjust(Duration::from_secs(1));
            steps += 1;
            assert!(steps < 10, "the window does not reach 0");
        }
        // Idle stays idle.
        p.adjust(Duration::from_secs(5));
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn a_small_largest_window_starts_at_itself() {
        let mut p = AdaptivePoll::new(us(2));
        p.adjust(us(1) + Duration::from_nanos(500));
        assert_eq!(p.window(), us(2));
    }

    #[test]
    fn polling_stops_at_the_first_ready_and_at_the_window() {
        let mut p = AdaptivePoll::new(us(32));
        p.adjust(us(10));
        let mut calls = 0;
        assert!(p.poll(p.start(), || {
            calls += 1;
            calls == 3
        }));
        assert_eq!(calls, 3);
        assert!(!p.poll(p.start(), || false));
    }
}
