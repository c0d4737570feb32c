//! What is in flight on one queue: every head popped from the avail ring and not yet put on
//! the used ring, whoever runs it (the queue thread, a helper thread, later an asynchronous
//! completion). It is the one record that stopping a queue waits on (GET_VRING_BASE, disable),
//! and, when the VMM negotiated INFLIGHT_SHMFD, it mirrors itself into the shared in-flight
//! region so that a restarted backend can resubmit what this one left unfinished.
//!
//! Slots are indexed by head: a driver may not make a head available again before the device
//! used it, so a head is unique while in flight (a head popped twice is a broken ring).
//!
//! The shared region (QEMU docs/interop/vhost-user.rst, "Inflight I/O tracking", split ring):
//! per queue a 16-byte header `features u64, version u16, desc_num u16, last_batch_head u16,
//! used_idx u16`, then `desc_num` entries of 16 bytes `inflight u8, padding [u8; 5], next u16,
//! counter u64`; each queue's part is `align_up(16 * queue_size + 2, 64)` bytes (libvhost-user's
//! formula, so that regions made by either line up). The region comes from the VMM and
//! outlives this process: it is read as untrusted input ([`recover`]) and accessed only
//! through vm-memory's bounds-checked volatile accessors.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, VolatileSlice};

/// Header bytes of a queue's part of the region.
const HEADER: usize = 16;
const ENTRY: usize = 16;
const VERSION: u16 = 1;
// Header fields.
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_AT: usize = 12;
const USED_IDX_AT: usize = 14;
// Entry fields.
const INFLIGHT_AT: usize = 0;
const NEXT_AT: usize = 6;
const COUNTER_AT: usize = 8;
/// The largest counter a region may hold (2^63: room for 2^63 more requests).
const MAX_COUNTER: u64 = 1 << 63;

/// Bytes of one queue's part of the region.
pub fn queue_region_size(queue_size: u16) -> usize {
    (ENTRY * usize::from(queue_size) + 2).next_multiple_of(64)
}

/// Bytes of the whole region.
pub fn region_size(num_queues: u16, queue_size: u16) -> usize {
    usize::from(num_queues) * queue_region_size(queue_size)
}

/// One queue's part of a shared in-flight region.
pub struct QueueRegion {
    slice: VolatileSlice<'static>,
    /// Keeps the mapping behind `slice` alive.
    _map: std::sync::Arc<dyn Send + Sync>,
}

// SAFETY: the slice points into a shared mapping that `_map` keeps alive for as long as the
// QueueRegion lives; it is only reached through volatile accesses, which any thread may make.
unsafe impl Send for QueueRegion {}
// SAFETY: as for Send; `&QueueRegion` only allows the same volatile accesses.
unsafe impl Sync for QueueRegion {}

impl QueueRegion {
    /// `slice` must be [`queue_region_size`] bytes of a mapping that `map` keeps alive.
    pub fn new(slice: VolatileSlice<'static>, map: std::sync::Arc<dyn Send + Sync>) -> Self {
        QueueRegion { slice, _map: map }
    }

    fn view(&self) -> View<'_> {
        View(self.slice)
    }
}

/// Typed access to a queue's part of the region. Accessors return 0 / do nothing outside the
/// slice; callers check the size first ([`recover`]), so that never happens in practice.
#[derive(Clone, Copy)]
struct View<'a>(VolatileSlice<'a>);

impl View<'_> {
    fn u16_at(&self, at: usize) -> u16 {
        self.0
            .load::<u16>(at, Ordering::Acquire)
            .map(u16::from_le)
            .unwrap_or(0)
    }
    fn set_u16(&self, at: usize, v: u16) {
        let _ = self.0.store(v.to_le(), at, Ordering::Release);
    }
    fn entry(i: u16) -> usize {
        HEADER + ENTRY * usize::from(i)
    }
    fn inflight(&self, i: u16) -> bool {
        self.0
            .load::<u8>(Self::entry(i) + INFLIGHT_AT, Ordering::Acquire)
            .unwrap_or(0)
            != 0
    }
    fn set_inflight(&self, i: u16, v: bool) {
        let _ = self
            .0
            .store(u8::from(v), Self::entry(i) + INFLIGHT_AT, Ordering::Release);
    }
    fn counter(&self, i: u16) -> u64 {
        self.0
            .load::<u64>(Self::entry(i) + COUNTER_AT, Ordering::Acquire)
            .map(u64::from_le)
            .unwrap_or(0)
    }
    fn set_counter(&self, i: u16, v: u64) {
        let _ = self
            .0
            .store(v.to_le(), Self::entry(i) + COUNTER_AT, Ordering::Release);
    }
    fn next(&self, i: u16) -> u16 {
        self.u16_at(Self::entry(i) + NEXT_AT)
    }
}

/// What a queue resumes with after a restart.
#[derive(Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The region was fresh (version 0): nothing to recover, and the ring's base stands.
    pub fresh: bool,
    /// Heads to run again before anything new, in the order they were first taken.
    pub heads: Vec<u16>,
    /// The counter to give the next head taken.
    pub next_counter: u64,
}

/// Reads a queue's part of the region when its ring starts: a fresh region (version 0) is
/// initialised; an old one is checked, its last batch fixed up if the backend died between
/// the used index and the bookkeeping (`used_idx` is the used ring's index now), and the heads
/// still in flight are returned in ascending counter order. Anything that cannot be right is
/// refused with the reason, and the region is then left as it was.
pub fn recover(
    region: VolatileSlice<'_>,
    queue_size: u16,
    used_idx: u16,
) -> Result<Recovery, String> {
    if queue_size == 0 {
        // Nothing a VMM can set up (SET_VRING_NUM refuses it); a region initialised for it
        // could not be read back.
        return Err("in-flight region for a queue of 0 entries".into());
    }
    if region.len() < queue_region_size(queue_size) {
        return Err(format!(
            "in-flight region of {} bytes is too small for a queue of {queue_size}",
            region.len()
        ));
    }
    let v = View(region);
    let version = v.u16_at(VERSION_AT);
    if version == 0 {
        // Fresh (the VMM zero-fills it): start tracking.
        v.set_u16(DESC_NUM_AT, queue_size);
        v.set_u16(LAST_BATCH_AT, 0);
        v.set_u16(USED_IDX_AT, used_idx);
        for i in 0..queue_size {
            v.set_inflight(i, false);
        }
        v.set_u16(VERSION_AT, VERSION);
        return Ok(Recovery {
            fresh: true,
            heads: Vec::new(),
            next_counter: 1,
        });
    }
    if version != VERSION {
        return Err(format!("in-flight region version {version} (expected 1)"));
    }
    let desc_num = v.u16_at(DESC_NUM_AT);
    if desc_num != queue_size {
        return Err(format!(
            "in-flight region made for a queue of {desc_num} entries, the queue has {queue_size}"
        ));
    }
    let last_batch = v.u16_at(LAST_BATCH_AT);
    if last_batch >= desc_num {
        return Err(format!(
            "in-flight region's last batch head {last_batch} is past the queue ({desc_num})"
        ));
    }
    let recorded_used = v.u16_at(USED_IDX_AT);
    // Heads of the last batch whose in-flight flag may not have been cleared (a bitmap: a
    // hostile region may make the batch as long as a queue of 32768).
    let mut batch = vec![false; usize::from(desc_num)];
    let batch_len = used_idx.wrapping_sub(recorded_used);
    if batch_len > desc_num {
        return Err(format!(
            "in-flight region's used index {recorded_used} is {batch_len} behind the ring's {used_idx}"
        ));
    }
    let mut head = last_batch;
    for k in 0..batch_len {
        if head >= desc_num || batch[usize::from(head)] {
            return Err(format!(
                "in-flight region's last batch list is broken at entry {k} (head {head})"
            ));
        }
        batch[usize::from(head)] = true;
        head = v.next(head);
    }
    let mut heads: Vec<(u64, u16)> = (0..desc_num)
        .filter(|&i| v.inflight(i) && !batch[usize::from(i)])
        .map(|i| (v.counter(i), i))
        .collect();
    heads.sort_unstable();
    if heads.windows(2).any(|w| w[0].0 == w[1].0) || heads.iter().any(|&(c, _)| c == 0) {
        return Err("in-flight region holds heads with equal or zero counters".into());
    }
    // The record goes on counting from the largest: leave it room (a real counter, one per
    // request, never gets near; a larger one is garbage and would overflow).
    if let Some(&(c, i)) = heads.last().filter(|&&(c, _)| c > MAX_COUNTER) {
        return Err(format!(
            "in-flight region's counter {c} (head {i}) is past {MAX_COUNTER}"
        ));
    }
    // Checked: now fix the region up.
    for i in (0..desc_num).filter(|&i| batch[usize::from(i)]) {
        v.set_inflight(i, false);
    }
    v.set_u16(USED_IDX_AT, used_idx);
    let next_counter = heads.last().map_or(1, |&(c, _)| c + 1);
    Ok(Recovery {
        fresh: false,
        heads: heads.into_iter().map(|(_, i)| i).collect(),
        next_counter,
    })
}

/// The per-queue record.
pub struct InflightRecord {
    in_flight: Vec<bool>,
    count: usize,
    counter: u64,
    region: Option<QueueRegion>,
}

impl InflightRecord {
    pub fn new(queue_size: u16) -> Self {
        InflightRecord {
            in_flight: vec![false; usize::from(queue_size)],
            count: 0,
            counter: 1,
            region: None,
        }
    }

    /// Starts over for a ring of `queue_size` (nothing may be in flight).
    pub fn reset(&mut self, queue_size: u16) {
        debug_assert_eq!(self.count, 0);
        self.in_flight.clear();
        self.in_flight.resize(usize::from(queue_size), false);
        self.count = 0;
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn has_region(&self) -> bool {
        self.region.is_some()
    }

    /// Mirrors into `region` from now on (None: stop mirroring).
    pub fn set_region(&mut self, region: Option<QueueRegion>) {
        self.region = region;
    }

    /// Recovers from the region (see [`recover`]): the heads returned are in flight again;
    /// `None` if there is no region or it was fresh (nothing to recover).
    pub fn recover(&mut self, queue_size: u16, used_idx: u16) -> Result<Option<Vec<u16>>, String> {
        let Some(r) = &self.region else {
            return Ok(None);
        };
        let rec = recover(r.slice, queue_size, used_idx)?;
        if rec.fresh {
            return Ok(None);
        }
        self.reset(queue_size);
        for &h in &rec.heads {
            self.in_flight[usize::from(h)] = true;
        }
        self.count = rec.heads.len();
        self.counter = rec.next_counter;
        Ok(Some(rec.heads))
    }

    /// Records `head` as taken; false if it is not a head of this queue or already in flight.
    pub fn begin(&mut self, head: u16) -> bool {
        match self.in_flight.get_mut(usize::from(head)) {
            Some(f) if !*f => *f = true,
            _ => return false,
        }
        self.count += 1;
        if let Some(r) = &self.region {
            let v = r.view();
            v.set_counter(head, self.counter);
            v.set_inflight(head, true);
        }
        self.counter += 1;
        true
    }

    /// Drops `head` from the record without touching the shared region (a recovered head that
    /// this ring will not run: the next recovery finds it again).
    pub fn forget(&mut self, head: u16) {
        if let Some(f) = self.in_flight.get_mut(usize::from(head)) {
            if *f {
                *f = false;
                self.count -= 1;
            }
        }
    }

    /// Before `head` goes on the used ring: it is the last batch (of one).
    pub fn before_used(&self, head: u16) {
        if let Some(r) = &self.region {
            r.view().set_u16(LAST_BATCH_AT, head);
        }
    }

    /// `head` is finished (on the used ring if `used_idx` is given, or dropped).
    pub fn end(&mut self, head: u16, used_idx: Option<u16>) {
        if let Some(f) = self.in_flight.get_mut(usize::from(head)) {
            if *f {
                *f = false;
                self.count -= 1;
            }
        }
        if let Some(r) = &self.region {
            let v = r.view();
            v.set_inflight(head, false);
            if let Some(u) = used_idx {
                v.set_u16(USED_IDX_AT, u);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queue region as a byte buffer, with helpers to craft it.
    struct Crafted(Vec<u8>);

    impl Crafted {
        fn new(qs: u16) -> Self {
            Crafted(vec![0; queue_region_size(qs)])
        }
        fn put16(&mut self, at: usize, v: u16) {
            self.0[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
        fn header(&mut self, version: u16, desc_num: u16, last_batch: u16, used_idx: u16) {
            self.put16(VERSION_AT, version);
            self.put16(DESC_NUM_AT, desc_num);
            self.put16(LAST_BATCH_AT, last_batch);
            self.put16(USED_IDX_AT, used_idx);
        }
        fn entry(&mut self, i: u16, inflight: bool, next: u16, counter: u64) {
            let at = HEADER + ENTRY * usize::from(i);
            self.0[at] = u8::from(inflight);
            self.put16(at + NEXT_AT, next);
            self.0[at + COUNTER_AT..at + 16].copy_from_slice(&counter.to_le_bytes());
        }
        fn recover(&mut self, qs: u16, used: u16) -> Result<Recovery, String> {
            recover(VolatileSlice::from(&mut self.0[..]), qs, used)
        }
    }

    #[test]
    fn sizes_match_libvhost_user() {
        assert_eq!(queue_region_size(256), 4160);
        assert_eq!(queue_region_size(1024), 16448);
        assert_eq!(region_size(2, 128), 2 * 2112);
    }

    #[test]
    fn a_fresh_region_is_initialised() {
        let mut r = Crafted::new(8);
        assert_eq!(
            r.recover(8, 5),
            Ok(Recovery {
                fresh: true,
                heads: vec![],
                next_counter: 1
            })
        );
        assert_eq!(r.0[VERSION_AT], 1);
        assert_eq!(r.0[DESC_NUM_AT], 8);
        assert_eq!(r.0[USED_IDX_AT], 5);
    }

    #[test]
    fn heads_come_back_in_ascending_counter_order() {
        let mut r = Crafted::new(8);
        r.header(1, 8, 0, 10);
        r.entry(5, true, 0, 30);
        r.entry(1, true, 0, 12);
        r.entry(7, true, 0, 20);
        r.entry(2, false, 0, 99);
        assert_eq!(
            r.recover(8, 10),
            Ok(Recovery {
                fresh: false,
                heads: vec![1, 7, 5],
                next_counter: 31
            })
        );
    }

    #[test]
    fn the_last_batch_is_fixed_up() {
        // Died after used->idx moved from 10 to 12 for heads 3 and 6, before clearing them.
        let mut r = Crafted::new(8);
        r.header(1, 8, 3, 10);
        r.entry(3, true, 6, 4);
        r.entry(6, true, 0, 5);
        r.entry(4, true, 0, 7);
        let rec = r.recover(8, 12).unwrap();
        assert_eq!(rec.heads, vec![4]);
        assert_eq!(r.0[HEADER + ENTRY * 3], 0);
        assert_eq!(r.0[HEADER + ENTRY * 6], 0);
        assert_eq!(r.0[USED_IDX_AT], 12);
        // Done once: a second recovery finds the same.
        assert_eq!(r.recover(8, 12).unwrap().heads, vec![4]);
    }

    #[test]
    fn a_region_from_another_queue_size_is_refused() {
        let mut r = Crafted::new(16);
        r.header(1, 16, 0, 0);
        r.entry(1, true, 0, 1);
        let e = r.recover(8, 0).unwrap_err();
        assert!(e.contains("16 entries"), "{e}");
        // Too small for the queue.
        let mut small = Crafted::new(8);
        assert!(small.recover(16, 0).is_err());
        // A queue of 0 (found by fuzz/inflight_region): it used to be initialised as fresh,
        // then refused when read back.
        let mut zero = Crafted::new(0);
        assert!(zero.recover(0, 0).is_err());
        assert!(zero.0.iter().all(|&b| b == 0), "left alone");
    }

    #[test]
    fn malformed_regions_are_refused_and_left_alone() {
        type Craft = Box<dyn Fn(&mut Crafted)>;
        let cases: Vec<(&str, Craft)> = vec![
            ("version", Box::new(|r| r.header(2, 8, 0, 0))),
            ("last batch head", Box::new(|r| r.header(1, 8, 8, 0))),
            // used index 20 behind the ring: more than the queue holds.
            ("used index", Box::new(|r| r.header(1, 8, 0, 65530))),
            (
                "batch loop",
                Box::new(|r| {
                    r.header(1, 8, 2, 0);
                    r.entry(2, true, 2, 1);
                }),
            ),
            (
                "batch link",
                Box::new(|r| {
                    r.header(1, 8, 2, 0);
                    r.entry(2, true, 200, 1);
                }),
            ),
            (
                "equal counters",
                Box::new(|r| {
                    r.header(1, 8, 0, 10);
                    r.entry(1, true, 0, 5);
                    r.entry(2, true, 0, 5);
                }),
            ),
            (
                "zero counter",
                Box::new(|r| {
                    r.header(1, 8, 0, 10);
                    r.entry(1, true, 0, 0);
                }),
            ),
            // Seen while writing fuzz/inflight_region: accepted, and the record's next
            // `begin` overflowed its counter.
            (
                "counter at its limit",
                Box::new(|r| {
                    r.header(1, 8, 0, 10);
                    r.entry(1, true, 0, 5);
                    r.entry(2, true, 0, u64::MAX);
                }),
            ),
        ];
        for (name, craft) in cases {
            let mut r = Crafted::new(8);
            craft(&mut r);
            let before = r.0.clone();
            assert!(r.recover(8, 10).is_err(), "{name} accepted");
            assert_eq!(r.0, before, "{name}: region changed");
        }
    }

    #[test]
    fn the_record_mirrors_pop_and_push_into_the_region() {
        let map = std::sync::Arc::new(std::sync::Mutex::new(vec![0u8; queue_region_size(8)]));
        let ptr = map.lock().unwrap().as_mut_ptr();
        // SAFETY: the Vec lives in `map`, which the region keeps alive and nobody resizes.
        let slice = unsafe { VolatileSlice::new(ptr, queue_region_size(8)) };
        let mut rec = InflightRecord::new(8);
        rec.set_region(Some(QueueRegion::new(slice, map.clone())));
        assert_eq!(rec.recover(8, 0), Ok(None));
        assert!(rec.begin(3));
        assert!(!rec.begin(3), "a head in flight cannot be taken again");
        assert!(!rec.begin(8), "not a head of this queue");
        assert!(rec.begin(5));
        rec.before_used(5);
        rec.end(5, Some(1));
        assert_eq!(rec.len(), 1);
        // A restart now resubmits head 3 only.
        let mut again = InflightRecord::new(8);
        again.set_region(Some(QueueRegion::new(slice, map.clone())));
        assert_eq!(again.recover(8, 1), Ok(Some(vec![3])));
        assert_eq!(again.len(), 1);
        // Died after used idx 2 was published for head 3 but before the bookkeeping.
        again.before_used(3);
        let mut third = InflightRecord::new(8);
        third.set_region(Some(QueueRegion::new(slice, map)));
        assert_eq!(third.recover(8, 2), Ok(Some(vec![])));
    }
}
