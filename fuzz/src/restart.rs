//! What a restarted backend does with the requests the previous one left unfinished: the
//! device's own queue (`queue::Queue` over `ring::SplitRing`, its in-flight record mirrored into
//! an INFLIGHT_SHMFD region) serves well-formed requests on a small in-memory image, is killed
//! at a point the fuzzer chooses, and a new queue starts over the same guest memory and region
//! the way the handler's `start_ring` does it (`QueueState::resume`: used index from the ring,
//! `recover`, the avail index set past the recovered heads, the heads queued for
//! resubmission). Up to four such
//! sessions, the last one serving everything.
//!
//! A kill can fall anywhere, including inside a completion: after the in-flight record named
//! the head as the last batch but before it went on the used ring, or after it went on the used
//! ring but before the record cleared it (the case `recover`'s last-batch fix-up is for).
//!
//! Checked, after every restart and at the end:
//! - the restarted queue gives back first exactly the heads that were taken and not put on the
//!   used ring, in the order they were first taken, then the avail entries not yet taken, in
//!   avail order, then the new ones;
//! - every head completes exactly once over all sessions (the used ring holds each head made
//!   available once, none twice, none lost) and the used index ends at the number of requests;
//! - nothing is left in flight at the end, and a further recovery finds nothing;
//! - the image is clean (`check`).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use arbitrary::{Result, Unstructured};
use vhost_user_vhdx::inflight::{queue_region_size, recover, QueueRegion};
use vhost_user_vhdx::queue::{Outcome, Popped, Queue};
use vhost_user_vhdx::requests::Requests;
use vhost_user_vhdx::vhdx::{Chain, VhdxFile};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};

use crate::queue_requests::small_image;
use crate::storage::Capped;

const MEM: u64 = 1 << 20;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// Each head's own indirect table (three descriptors), so that chains never share descriptors.
const TABLES: u64 = 0x3000;
/// Each head's request header (and its status byte at +0x80).
const HEADERS: u64 = 0x4000;
/// Each head's data buffer (8 KiB).
const DATA: u64 = 0x1_0000;
const DISK_SECTORS: u64 = (4 << 20) / 512;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const SESSIONS: u8 = 4;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

fn put(mem: &GuestMemoryMmap, at: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(at)).expect("in memory");
}

fn get32(mem: &GuestMemoryMmap, at: u64) -> u32 {
    let mut b = [0u8; 4];
    mem.read_slice(&mut b, GuestAddress(at)).expect("in memory");
    u32::from_le_bytes(b)
}

/// The driver: what it made available, what it has seen come back.
struct Driver {
    mem: Arc<GuestMemoryMmap>,
    size: u16,
    event_idx: bool,
    avail_idx: u16,
    /// Used entries read so far (the used index the driver has consumed up to).
    seen_used: u16,
    /// Heads made available and not yet seen on the used ring.
    outstanding: Vec<bool>,
    /// How many times each head came back on the used ring, over all its requests.
    returned: Vec<u32>,
    /// How many requests were made available for each head.
    made: Vec<u32>,
}

impl Driver {
    /// Makes up to `k` free heads available, each with a well-formed request behind an
    /// indirect descriptor.
    fn add(&mut self, u: &mut Unstructured, model: &mut Model) -> Result<()> {
        let k = u.int_in_range(0..=self.size)?;
        for _ in 0..k {
            let free: Vec<u16> = (0..self.size)
                .filter(|&h| !self.outstanding[usize::from(h)])
                .collect();
            if free.is_empty() {
                break;
            }
            let head = free[u.choose_index(free.len()).unwrap_or(0)];
            self.request(u, head)?;
            let slot = u64::from(self.avail_idx % self.size);
            put(&self.mem, AVAIL + 4 + 2 * slot, &head.to_le_bytes());
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.outstanding[usize::from(head)] = true;
            self.made[usize::from(head)] += 1;
            model.not_taken.push_back(head);
        }
        put(&self.mem, AVAIL + 2, &self.avail_idx.to_le_bytes());
        Ok(())
    }

    fn request(&self, u: &mut Unstructured, head: u16) -> Result<()> {
        let any: u32 = u.arbitrary()?;
        let kind: u32 = *u.choose(&[0, 1, 4, 8, 11, 13, any])?;
        let sector: u64 = if u.ratio(1, 16)? {
            u.arbitrary()?
        } else {
            u.int_in_range(0..=DISK_SECTORS + 16)?
        };
        let h = u64::from(head);
        let header = HEADERS + 0x100 * h;
        let status = header + 0x80;
        let data = DATA + 0x2000 * h;
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        if kind == 11 || kind == 13 {
            // One range: sector, count, flags.
            let mut r = [0u8; 16];
            r[0..8].copy_from_slice(&sector.to_le_bytes());
            r[8..12].copy_from_slice(&u.int_in_range(0..=64u32)?.to_le_bytes());
            put(&self.mem, data, &r);
        }
        put(&self.mem, header, &hdr);
        let len = 512 * u.int_in_range(0..=16u32)?;
        let writable = kind == 0 || kind == 8;
        let table = TABLES + 0x40 * h;
        let entries: u32 = if len == 0 {
            put(&self.mem, table, &desc(header, 16, F_NEXT, 1));
            put(&self.mem, table + 16, &desc(status, 1, F_WRITE, 0));
            2
        } else {
            let f = F_NEXT | if writable { F_WRITE } else { 0 };
            put(&self.mem, table, &desc(header, 16, F_NEXT, 1));
            put(&self.mem, table + 16, &desc(data, len, f, 2));
            put(&self.mem, table + 32, &desc(status, 1, F_WRITE, 0));
            3
        };
        put(
            &self.mem,
            DESC + 16 * h,
            &desc(table, 16 * entries, F_INDIRECT, 0),
        );
        Ok(())
    }

    /// Reads the used ring up to `used`: every entry is a head it made available and had not
    /// seen back.
    fn collect(&mut self, used: u16) {
        while self.seen_used != used {
            let slot = u64::from(self.seen_used % self.size);
            let head = get32(&self.mem, USED + 4 + 8 * slot);
            assert!(head < u32::from(self.size), "used head {head}");
            let h = head as usize;
            assert!(
                self.outstanding[h],
                "head {head} on the used ring, but not outstanding (twice?)"
            );
            self.outstanding[h] = false;
            self.returned[h] += 1;
            self.seen_used = self.seen_used.wrapping_add(1);
        }
    }
}

/// What the device should hand out next.
#[derive(Default)]
struct Model {
    /// Taken and not on the used ring, in the order first taken.
    taken: Vec<u16>,
    /// Available and not taken, in avail order.
    not_taken: VecDeque<u16>,
}

impl Model {
    /// What a pop must return: the first resubmitted head, else the next avail entry.
    fn expect_pop(&mut self, resubmitting: &mut VecDeque<u16>, head: u16) {
        let want = match resubmitting.pop_front() {
            Some(h) => h,
            None => {
                let h = self
                    .not_taken
                    .pop_front()
                    .expect("a pop with nothing available");
                self.taken.push(h);
                h
            }
        };
        assert_eq!(head, want, "popped head");
    }

    fn used(&mut self, head: u16) {
        let i = self.taken.iter().position(|&h| h == head).expect("taken");
        self.taken.remove(i);
    }
}

type Region = Arc<Mutex<Vec<u8>>>;

/// A queue as the handler sets it up, over `region`, started as `start_ring` does it.
/// Returns the queue and the heads it will resubmit.
fn start(d: &Driver, region: &Region, first: bool) -> (Queue, Vec<u16>) {
    let size = d.size;
    let q = Queue::new(0, size).unwrap();
    let mut st = q.lock();
    st.ring.desc = GuestAddress(DESC);
    st.ring.avail = GuestAddress(AVAIL);
    st.ring.used = GuestAddress(USED);
    st.ring.event_idx = d.event_idx;
    st.addresses_set = true;
    st.set_mem(Arc::clone(&d.mem));
    st.set_enabled(true);
    st.set_kick(None);
    let ptr = region.lock().unwrap().as_mut_ptr();
    // SAFETY: the Vec lives in `region`, which the QueueRegion keeps alive, and is never
    // resized; the queue is used from this thread only.
    let slice = unsafe { VolatileSlice::new(ptr, queue_region_size(size)) };
    st.inflight
        .set_region(Some(QueueRegion::new(slice, region.clone())));
    // As the handler's start_ring.
    let heads = match st.resume(&d.mem) {
        Ok(None) => {
            assert!(first, "a region the last session wrote was fresh");
            // A first start: SET_VRING_BASE put the ring at the driver's index.
            let used = st.ring.used_idx(&d.mem).expect("in memory");
            st.ring.set_next_avail(used);
            st.ring.set_next_used(used);
            Vec::new()
        }
        Ok(Some(heads)) => heads,
        Err(e) => panic!("the region the last session wrote was refused: {e:?}"),
    };
    drop(st);
    (q, heads)
}

/// Where a kill lands in the session.
enum Kill {
    /// Between requests.
    Between,
    /// Inside a completion: the record names the head as the last batch, not yet used.
    BeforeUsed,
    /// Inside a completion: on the used ring, the record not yet cleared.
    AfterUsed,
}

pub fn run(data: &[u8]) {
    let _ = drive(Unstructured::new(data));
}

fn drive(mut u: Unstructured) -> Result<()> {
    let u = &mut u;
    let size = *u.choose(&[8u16, 1, 2, 4, 16, 32])?;
    let event_idx = u.arbitrary()?;
    let base: u16 = if u.ratio(1, 2)? { 0 } else { u.arbitrary()? };
    let sessions = u.int_in_range(1..=SESSIONS)?;
    let mem =
        Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap());
    put(&mem, AVAIL + 2, &base.to_le_bytes());
    put(&mem, USED + 2, &base.to_le_bytes());
    let mut d = Driver {
        mem: Arc::clone(&mem),
        size,
        event_idx,
        avail_idx: base,
        seen_used: base,
        outstanding: vec![false; usize::from(size)],
        returned: vec![0; usize::from(size)],
        made: vec![0; usize::from(size)],
    };
    let file = VhdxFile::open_storage(
        Arc::new(Capped::from_pages(small_image(512))),
        PathBuf::from("/fuzz/disk.vhdx"),
        true,
    )
    .expect("a new image opens");
    let requests = Requests {
        chain: Arc::new(Chain::from_layers(vec![file]).unwrap()),
        read_only: false,
        serial: "fuzz".into(),
        writethrough: AtomicBool::new(u.arbitrary()?),
    };
    let region: Region = Arc::new(Mutex::new(vec![0u8; queue_region_size(size)]));
    let mut model = Model::default();

    for session in 0..sessions {
        let last = session + 1 == sessions;
        let (q, heads) = start(&d, &region, session == 0);
        // Exactly the heads taken and not used, in the order they were first taken.
        assert_eq!(heads, model.taken, "recovered heads (session {session})");
        let mut resubmitting: VecDeque<u16> = heads.into();
        let mut batch: Vec<Popped> = Vec::new();
        let mut killed = false;
        // The driver adds, the device serves, a few times; then a kill unless this is the last.
        for _ in 0..u.int_in_range(1..=3u8)? {
            d.add(u, &mut model)?;
            loop {
                while let Some(p) = q.pop() {
                    model.expect_pop(&mut resubmitting, p.head);
                    batch.push(p);
                    if u.ratio(1, 4)? {
                        break;
                    }
                }
                if batch.is_empty() {
                    break;
                }
                for _ in 0..u.int_in_range(1..=batch.len())? {
                    let p = batch.swap_remove(u.choose_index(batch.len())?);
                    let outcome = requests.run_popped(&p);
                    let Outcome::Used(len) = outcome else {
                        panic!("a well-formed request broke the ring");
                    };
                    if !last && u.ratio(1, 16)? {
                        kill_inside(&q, &mem, p.head, len, u.arbitrary()?, &mut model);
                        killed = true;
                        break;
                    }
                    q.complete(p.head, outcome, false);
                    model.used(p.head);
                }
                if killed || (!last && u.ratio(1, 8)?) {
                    break;
                }
            }
            if killed {
                break;
            }
        }
        if last {
            // Everything: resubmitted, taken and available.
            assert!(resubmitting.is_empty(), "resubmitted heads not popped");
            assert!(model.not_taken.is_empty(), "a working ring is drained");
            assert!(q.lock().inflight.is_empty(), "left in flight at the end");
        }
        // The kill (or the end): the queue is dropped with whatever it holds.
        let used = q.lock().ring.used_idx(&mem).unwrap();
        drop(batch);
        drop(q);
        d.collect(used);
    }

    // Every request came back exactly once.
    for h in 0..usize::from(size) {
        assert_eq!(
            d.returned[h], d.made[h],
            "head {h}: {} requests, {} completions",
            d.made[h], d.returned[h]
        );
    }
    let mut copy = region.lock().unwrap().clone();
    let mut used = [0u8; 2];
    mem.read_slice(&mut used, GuestAddress(USED + 2)).unwrap();
    let used = u16::from_le_bytes(used);
    assert_eq!(
        used,
        base.wrapping_add(d.made.iter().sum::<u32>() as u16),
        "used index after every request completed"
    );
    let rec = recover(VolatileSlice::from(&mut copy[..]), size, used)
        .expect("the final region is accepted");
    assert!(
        rec.heads.is_empty(),
        "in flight after the end: {:?}",
        rec.heads
    );

    let chain = Arc::into_inner(requests.chain).unwrap();
    let report = vhost_user_vhdx::vhdx::check::check_file(chain.leaf());
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    chain.close().unwrap();
    Ok(())
}

/// A kill during the completion of `head` (see [`Kill`]), done with the record's and the ring's
/// own steps in the order `Queue::complete` takes them.
fn kill_inside(q: &Queue, mem: &GuestMemoryMmap, head: u16, len: u32, at: u8, model: &mut Model) {
    let kill = match at % 3 {
        0 => Kill::Between,
        1 => Kill::BeforeUsed,
        _ => Kill::AfterUsed,
    };
    let mut st = q.lock();
    match kill {
        Kill::Between => {}
        Kill::BeforeUsed => st.inflight.before_used(head),
        Kill::AfterUsed => {
            st.inflight.before_used(head);
            st.ring.add_used(mem, head, len).expect("the usual layout");
            model.used(head);
        }
    }
}
