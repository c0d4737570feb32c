//! Whole descriptor chains through the device's own split ring and queue (`ring::SplitRing`
//! behind `queue::Queue`: pop, the in-flight record, `complete` → `add_used`, notification
//! suppression with and without EVENT_IDX) into the request executor (`Requests::run_popped`)
//! on a small writable image, in memory or in a plain file (then data moves by
//! `preadv`/`pwritev` straight from guest memory: `guest_io`'s `unsafe` code).
//!
//! The fuzzer plays the driver. It lays out guest memory: the three ring areas (usually where
//! a driver puts them, the descriptor table at GPA 0; sometimes anywhere, misaligned,
//! overlapping or outside memory), the descriptor table (random descriptors and well-formed
//! request chains), an indirect table, avail entries and index (any jump), the avail flags and
//! `used_event`; then up to four rounds of "the driver adds, the device serves", the device
//! possibly stopped (GET_VRING_BASE) or started again between rounds, requests completed in
//! any order, and possibly a crash. Checked:
//! - every popped head is below the queue size, at most `size` are in flight;
//! - the used index advances by exactly the completions, and the used ring holds exactly their
//!   (head, length) pairs; a ring that is not broken drains the avail ring and puts everything
//!   it popped on the used ring;
//! - the device writes neither the descriptor table nor the avail ring;
//! - a stopped or broken ring stays stopped: nothing is popped, the used ring is not touched;
//! - every notification decision matches virtio 1.2 §2.7.10 (a separately written model);
//! - the in-flight region the record mirrors into recovers exactly the heads popped and not
//!   completed, in the order they were taken (nothing after a clean round);
//! - afterwards `check` finds the image clean.
//!
//! The memory checks need rings that are in memory and do not overlap each other (otherwise
//! the driver's own writes change them); the others hold for any layout.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::{Result, Unstructured};
use vhost_user_vhdx::inflight::{queue_region_size, recover, QueueRegion};
use vhost_user_vhdx::queue::{Outcome, Popped, Queue};
use vhost_user_vhdx::requests::Requests;
use vhost_user_vhdx::vhdx::create::{create_on, CreateOptions};
use vhost_user_vhdx::vhdx::{Chain, Storage, VhdxFile};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, VolatileSlice};

use crate::storage::{Capped, Pages};

/// Guest memory; the usual ring layout is at its start, request buffers after [`DATA`].
const MEM: u64 = 1 << 20;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const INDIRECT: u64 = 0x3000;
const DATA: u64 = 0x4000;
/// The disk: 4 MiB in 1 MiB blocks.
const DISK: u64 = 4 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// A new image, made once per process and copied for each input.
pub fn small_image(logical_sector_size: u32) -> Pages {
    static IMAGES: OnceLock<[Pages; 2]> = OnceLock::new();
    let images = IMAGES.get_or_init(|| {
        [512, 4096].map(|lss| {
            let storage = Capped::default();
            create_on(
                &storage,
                &CreateOptions {
                    virtual_size: Some(DISK),
                    block_size: Some(1 << 20),
                    logical_sector_size: Some(lss),
                    ..Default::default()
                },
            )
            .unwrap();
            storage.to_pages()
        })
    });
    images[usize::from(logical_sector_size == 4096)].clone()
}

/// The image in an unlinked temporary file: only its non-zero pages are written.
fn in_file(image: &Pages) -> std::fs::File {
    use std::os::unix::fs::FileExt;
    let path = std::env::temp_dir().join(format!(
        "vhdx-fuzz-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file.set_len(image.size()).unwrap();
    for (at, page) in image.pages() {
        let n = page.len().min((image.size() - at) as usize);
        file.write_all_at(&page[..n], at).unwrap();
    }
    file
}

fn flags(u: &mut Unstructured) -> Result<u16> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => F_NEXT,
        1 => F_WRITE,
        2 => F_NEXT | F_WRITE,
        3 => 0,
        4 => F_INDIRECT,
        5 => F_NEXT | F_INDIRECT,
        _ => u.arbitrary()?,
    })
}

/// One random descriptor of a table of `entries`, little-endian as in guest memory.
fn raw(u: &mut Unstructured, entries: u16) -> Result<[u8; 16]> {
    let flags = flags(u)?;
    let (addr, len) = if flags & F_INDIRECT != 0 && u.ratio(3, 4)? {
        (INDIRECT, 16 * u.int_in_range(1..=8u32)?)
    } else {
        let addr = match u.int_in_range(0..=15u8)? {
            0 => u.arbitrary()?,
            // Into the rings or the indirect table.
            1 => u.int_in_range(0..=DATA)?,
            _ => u.int_in_range(DATA..=MEM + 4096)? / 16 * 16,
        };
        let len = if u.ratio(1, 16)? {
            u.arbitrary()?
        } else {
            u.int_in_range(0..=64u32 << 10)?
        };
        (addr, len)
    };
    let next = if u.ratio(1, 16)? {
        u.arbitrary()?
    } else {
        u.int_in_range(0..=entries.max(1) - 1)?
    };
    Ok(desc(addr, len, flags, next))
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// Driver writes: wherever the fuzzer put the rings, a write that misses memory is dropped.
fn put(mem: &GuestMemoryMmap, at: u64, bytes: &[u8]) {
    let _ = mem.write_slice(bytes, GuestAddress(at));
}

fn get16(mem: &GuestMemoryMmap, at: u64) -> Option<u16> {
    let mut b = [0u8; 2];
    mem.read_slice(&mut b, GuestAddress(at)).ok()?;
    Some(u16::from_le_bytes(b))
}

fn get32(mem: &GuestMemoryMmap, at: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    mem.read_slice(&mut b, GuestAddress(at)).ok()?;
    Some(u32::from_le_bytes(b))
}

fn snapshot(mem: &GuestMemoryMmap, at: u64, len: u64) -> Option<Vec<u8>> {
    let mut b = vec![0u8; len as usize];
    mem.read_slice(&mut b, GuestAddress(at)).ok()?;
    Some(b)
}

/// An area's address: usually `usual` (also when the input has run out), sometimes anywhere.
fn area(u: &mut Unstructured, usual: u64, align: u64) -> Result<u64> {
    Ok(match u.int_in_range(0..=15u8)? {
        13 => u.arbitrary()?,
        14 => u.int_in_range(0..=MEM)?,
        15 => u.int_in_range(0..=MEM)? / align * align,
        _ => usual,
    })
}

/// What the driver knows and what the harness expects.
struct Driver {
    mem: Arc<GuestMemoryMmap>,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    /// The avail index the driver published.
    avail_idx: u16,
    /// The used index at the last notification decision.
    decided_at: u16,
    /// Heads popped and not completed, in the order they were popped.
    in_flight: Vec<u16>,
    /// The rings are in memory and do not overlap: memory checks apply.
    sane: bool,
}

impl Driver {
    fn used_event_at(&self) -> u64 {
        self.avail.wrapping_add(4 + 2 * u64::from(self.size))
    }

    fn avail_event_at(&self) -> u64 {
        self.used.wrapping_add(4 + 8 * u64::from(self.size))
    }

    /// A well-formed request chain at `head`: header, up to one data buffer, status.
    fn request(&self, u: &mut Unstructured, head: u16) -> Result<()> {
        let (size, mem) = (self.size, &*self.mem);
        let any: u32 = u.arbitrary()?;
        let kind: u32 = *u.choose(&[0, 1, 4, 8, 11, 13, any])?;
        let sector: u64 = if u.ratio(1, 16)? {
            u.arbitrary()?
        } else {
            u.int_in_range(0..=DISK / 512 + 16)?
        };
        let slot = u64::from(head % 16);
        let header = DATA + 0x100 * slot;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        put(mem, header, &h);
        let data = 0x2_0000 + 0x1_0000 * (slot % 8);
        let len = 512 * u.int_in_range(0..=16u32)?;
        let writable = kind == 0 || kind == 8;
        let status = DATA + 0x100 * slot + 0x80;
        let at = |k: u16| self.desc.wrapping_add(16 * u64::from((head + k) % size));
        let idx = |k: u16| (head + k) % size;
        if size < 3 || len == 0 {
            put(mem, at(0), &desc(header, 16, F_NEXT, idx(1)));
            put(mem, at(1), &desc(status, 1, F_WRITE, 0));
        } else {
            put(mem, at(0), &desc(header, 16, F_NEXT, idx(1)));
            let f = F_NEXT | if writable { F_WRITE } else { 0 };
            put(mem, at(1), &desc(data, len, f, idx(2)));
            put(mem, at(2), &desc(status, 1, F_WRITE, 0));
        }
        Ok(())
    }

    /// The driver's turn: new requests on the avail ring, and its wishes about interrupts.
    fn add(&mut self, u: &mut Unstructured) -> Result<()> {
        let size = self.size;
        for _ in 0..u.int_in_range(0..=2u8)? {
            let i = u.int_in_range(0..=size - 1)?;
            let d = raw(u, size)?;
            put(&self.mem, self.desc.wrapping_add(16 * u64::from(i)), &d);
        }
        // (`ratio` is true and integers are their least once the input has run out: then a
        // whole ring of well-formed requests, no crash.)
        let k: u16 = if u.ratio(15, 16)? {
            match u.int_in_range(0..=size + 1)? {
                0 => size,
                k if k == size => 0,
                k => k,
            }
        } else {
            u.arbitrary()?
        };
        let start: u16 = u.arbitrary()?;
        for j in 0..k.min(size) {
            let head = if u.ratio(7, 8)? {
                start.wrapping_add(j) % size
            } else {
                u.arbitrary()?
            };
            if head < size && u.ratio(1, 2)? {
                self.request(u, head)?;
            }
            let slot = u64::from(self.avail_idx.wrapping_add(j) % size);
            put(
                &self.mem,
                self.avail.wrapping_add(4 + 2 * slot),
                &head.to_le_bytes(),
            );
        }
        self.avail_idx = self.avail_idx.wrapping_add(k);
        put(
            &self.mem,
            self.avail.wrapping_add(2),
            &self.avail_idx.to_le_bytes(),
        );
        let flags: u16 = if u.ratio(1, 8)? {
            u.arbitrary()?
        } else {
            u.int_in_range(0..=1)?
        };
        put(&self.mem, self.avail, &flags.to_le_bytes());
        let used_event: u16 = if u.ratio(1, 4)? {
            u.arbitrary()?
        } else {
            self.decided_at.wrapping_add(u.int_in_range(0..=size)?)
        };
        put(&self.mem, self.used_event_at(), &used_event.to_le_bytes());
        Ok(())
    }

    /// Asks the ring whether to notify and compares with virtio 1.2 §2.7.10.
    fn decide(&mut self, q: &Queue) {
        let mut st = q.lock();
        if st.broken().is_some() {
            return;
        }
        let new = st.ring.next_used();
        let old = std::mem::replace(&mut self.decided_at, new);
        let Ok(notify) = st.ring.needs_notification(&self.mem) else {
            return;
        };
        if !self.sane {
            return;
        }
        let expected = if self.event_idx {
            // Notify iff the driver asked to be told when the entry at used index
            // `used_event` is used, and that was one of the entries added since the last
            // decision (indices old .. new - 1).
            let wanted = get16(&self.mem, self.used_event_at()).expect("in memory");
            (0..new.wrapping_sub(old)).any(|k| old.wrapping_add(k) == wanted)
        } else {
            get16(&self.mem, self.avail).expect("in memory") & 1 == 0
        };
        assert_eq!(
            notify, expected,
            "notification decision, used {old} -> {new}"
        );
    }

    /// A crash now: the in-flight region names exactly the heads popped and not completed,
    /// in the order they were taken.
    fn crash(&self, region: &Mutex<Vec<u8>>) {
        if !self.sane {
            return;
        }
        let mut copy = region.lock().unwrap().clone();
        let used = get16(&self.mem, self.used.wrapping_add(2)).expect("in memory");
        let rec = recover(VolatileSlice::from(&mut copy[..]), self.size, used)
            .expect("the region the record wrote is accepted");
        assert!(!rec.fresh);
        assert_eq!(rec.heads, self.in_flight, "recovered heads");
    }
}

pub fn run(data: &[u8]) {
    let _ = drive(Unstructured::new(data));
}

fn drive(mut u: Unstructured) -> Result<()> {
    let u = &mut u;
    let lss = if u.ratio(1, 4)? { 4096 } else { 512 };
    let writethrough = u.arbitrary()?;
    let plain_file = u.arbitrary()?;
    let size = *u.choose(&[8u16, 1, 2, 4, 16, 32])?;
    let (desc, avail, used) = (area(u, DESC, 16)?, area(u, AVAIL, 2)?, area(u, USED, 4)?);
    let event_idx = u.arbitrary()?;
    let base: u16 = if u.ratio(1, 2)? { 0 } else { u.arbitrary()? };
    let mem =
        Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap());
    // The indirect table, then request headers, data and range lists from the rest of the
    // input (a few copies, so that short inputs still put headers where chains point).
    for i in 0..8 {
        let d = raw(u, 8)?;
        put(&mem, INDIRECT + 16 * i, &d);
    }
    let mut d = Driver {
        mem: Arc::clone(&mem),
        size,
        desc,
        avail,
        used,
        event_idx,
        avail_idx: base,
        decided_at: base,
        in_flight: Vec::new(),
        sane: false,
    };
    for i in 0..size {
        let r = raw(u, size)?;
        put(&mem, desc.wrapping_add(16 * u64::from(i)), &r);
    }
    put(&mem, used.wrapping_add(2), &base.to_le_bytes());
    put(&mem, avail.wrapping_add(2), &base.to_le_bytes());
    let rounds = u.int_in_range(1..=4u8)?;
    let plan: Vec<u8> = (0..rounds).map(|_| u.arbitrary()).collect::<Result<_>>()?;
    // The driver's and the device's choices, round after round.
    let len = u.arbitrary_len::<u8>()?.min(2048);
    let script = u.bytes(len)?.to_vec();
    let bytes = std::mem::replace(u, Unstructured::new(&[])).take_rest();
    if !bytes.is_empty() {
        for at in [0x1_0000, 0x8_0000] {
            let n = bytes.len().min((MEM - at) as usize);
            put(&mem, at, &bytes[..n]);
        }
    }
    let mut script = Unstructured::new(&script);

    let storage: Arc<dyn Storage> = if plain_file {
        Arc::new(in_file(&small_image(lss)))
    } else {
        Arc::new(Capped::from_pages(small_image(lss)))
    };
    let file = VhdxFile::open_storage(storage, PathBuf::from("/fuzz/disk.vhdx"), true)
        .expect("a new image opens");
    let requests = Requests {
        chain: Arc::new(Chain::from_layers(vec![file]).unwrap()),
        read_only: false,
        serial: "fuzz".into(),
        writethrough: AtomicBool::new(writethrough),
    };

    // The queue as the handler sets it up, with an in-flight region (INFLIGHT_SHMFD).
    let q = Queue::new(0, size).unwrap();
    let region = Arc::new(Mutex::new(vec![0u8; queue_region_size(size)]));
    {
        let mut st = q.lock();
        st.ring.desc = GuestAddress(desc);
        st.ring.avail = GuestAddress(avail);
        st.ring.used = GuestAddress(used);
        st.ring.event_idx = event_idx;
        st.ring.set_next_avail(base);
        st.ring.set_next_used(base);
        st.addresses_set = true;
        st.set_mem(Arc::clone(&mem));
        st.set_enabled(true);
        st.set_kick(None);
        let ptr = region.lock().unwrap().as_mut_ptr();
        // SAFETY: the Vec lives in `region`, which the QueueRegion keeps alive, and is never
        // resized; the harness is single-threaded.
        let slice = unsafe { VolatileSlice::new(ptr, queue_region_size(size)) };
        st.inflight
            .set_region(Some(QueueRegion::new(slice, region.clone())));
        assert_eq!(st.inflight.recover(size, base), Ok(None), "a fresh region");
        let areas = st.ring.areas();
        let disjoint = areas.iter().enumerate().all(|(i, a)| {
            areas[i + 1..].iter().all(|b| {
                a.1 .0.saturating_add(a.2) <= b.1 .0 || b.1 .0.saturating_add(b.2) <= a.1 .0
            })
        });
        // The indirect table and the request buffers are not protected from the device.
        let clear = areas.iter().all(|a| a.1 .0.saturating_add(a.2) <= INDIRECT);
        d.sane = st.ring.check(&mem).is_ok() && disjoint && clear;
        // The avail_event word (EVENT_IDX) lies past the used ring's checked area.
        d.sane &= mem.check_range(
            GuestAddress(d.avail_event_at()),
            2,
            vm_memory::Permissions::ReadWrite,
        ) || !event_idx;
        d.sane &= d.avail_event_at() <= INDIRECT - 2 || !event_idx;
    }

    let mut stopped = false;
    for action in plan {
        d.add(&mut script)?;
        match action % 8 {
            6 => {
                let next = q.stop(false);
                assert_eq!(next, q.lock().ring.next_avail());
                stopped = true;
            }
            7 => {
                q.lock().set_kick(None);
                stopped = false;
            }
            _ => {}
        }
        if serve(&q, &requests, &mut d, &mut script, stopped, &region) {
            break;
        }
    }

    // Whatever the guest sent, the image stays consistent.
    drop(q);
    let chain = Arc::into_inner(requests.chain).unwrap();
    let report = vhost_user_vhdx::vhdx::check::check_file(chain.leaf());
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    chain.close().unwrap();
    Ok(())
}

/// The device's turn, as `BlockDevice::process_queue` and `run_batch` do it, with the
/// completion order chosen by the fuzzer. Returns true after a crash.
fn serve(
    q: &Queue,
    requests: &Requests,
    d: &mut Driver,
    u: &mut Unstructured,
    stopped: bool,
    region: &Mutex<Vec<u8>>,
) -> bool {
    let (size, mem) = (d.size, Arc::clone(&d.mem));
    let broken_before = q.lock().broken().is_some();
    let next_used_before = q.lock().ring.next_used();
    let used_before = get16(&mem, d.used.wrapping_add(2));
    let rings_before = [
        snapshot(&mem, d.desc, 16 * u64::from(size)),
        snapshot(&mem, d.avail, 4 + 2 * u64::from(size)),
    ];
    let mut completions: Vec<(u16, u32)> = Vec::new();
    let mut batch: Vec<Popped> = Vec::new();
    for _ in 0..4 {
        q.disable_notification();
        loop {
            while let Some(p) = q.pop() {
                assert!(
                    !stopped && !broken_before,
                    "a stopped or broken ring gave a request"
                );
                assert!(p.head < size, "head {} of a queue of {size}", p.head);
                d.in_flight.push(p.head);
                assert!(
                    d.in_flight.len() <= usize::from(size),
                    "more in flight than the queue holds"
                );
                batch.push(p);
                if u.ratio(1, 4).unwrap_or(false) {
                    break;
                }
            }
            if batch.is_empty() {
                break;
            }
            let n = u.int_in_range(1..=batch.len()).unwrap_or(batch.len());
            for _ in 0..n {
                if !u.ratio(63, 64).unwrap_or(true) {
                    d.crash(region);
                    return true;
                }
                let i = u.choose_index(batch.len()).unwrap_or(0);
                let p = batch.swap_remove(i);
                let outcome = requests.run_popped(&p);
                let len = match outcome {
                    Outcome::Used(len) => Some(len),
                    Outcome::Broken(_) => None,
                };
                let on_ring = q.complete(p.head, outcome, false);
                d.in_flight.retain(|&h| h != p.head);
                if on_ring {
                    completions.push((p.head, len.expect("only a used outcome goes on the ring")));
                }
                if u.ratio(1, 8).unwrap_or(false) {
                    d.decide(q);
                }
            }
        }
        d.decide(q);
        let more = q.enable_notification();
        let st = q.lock();
        if d.sane && !stopped && st.broken().is_none() && d.event_idx {
            assert_eq!(
                get16(&mem, d.avail_event_at()),
                Some(st.ring.next_avail()),
                "avail_event after enabling notifications"
            );
        }
        drop(st);
        if !more {
            break;
        }
    }

    let st = q.lock();
    assert!(
        st.inflight.is_empty() && d.in_flight.is_empty(),
        "everything popped completed"
    );
    let n = completions.len() as u16;
    assert_eq!(st.ring.next_used(), next_used_before.wrapping_add(n));
    if stopped || broken_before {
        assert!(completions.is_empty());
    }
    // (With overlapping rings the used index may be written over the avail index.)
    if d.sane && !stopped && st.broken().is_none() {
        assert_eq!(
            st.ring.next_avail(),
            d.avail_idx,
            "a working ring is drained"
        );
    }
    if d.sane {
        let used_now = get16(&mem, d.used.wrapping_add(2));
        assert_eq!(
            used_now,
            used_before.map(|u| u.wrapping_add(n)),
            "used index"
        );
        let first = completions.len().saturating_sub(usize::from(size));
        for (i, &(head, len)) in completions.iter().enumerate().skip(first) {
            let slot = u64::from(used_before.unwrap().wrapping_add(i as u16) % size);
            let at = d.used.wrapping_add(4 + 8 * slot);
            assert_eq!(
                get32(&mem, at),
                Some(u32::from(head)),
                "used entry {i}: head"
            );
            assert_eq!(get32(&mem, at + 4), Some(len), "used entry {i}: length");
        }
        let rings_after = [
            snapshot(&mem, d.desc, 16 * u64::from(size)),
            snapshot(&mem, d.avail, 4 + 2 * u64::from(size)),
        ];
        assert!(
            rings_before == rings_after,
            "the device wrote into the descriptor table or avail ring"
        );
        drop(st);
        d.crash(region);
    }
    false
}
