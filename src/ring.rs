//! One split virtqueue (virtio 1.2 §2.7) as the device sees it: where its three areas are,
//! which avail entry comes next, and the used ring it completes into.
//!
//! Written here rather than taken from virtio-queue's `Queue` because the device needs what
//! that type does not give: a chain rebuilt from a head index alone (in-flight resubmission
//! after a restart), the avail index checked and reported as an error rather than logged and
//! retried (a driver that advances it by more than the queue size stopped the queue thread in
//! a loop before), a ring at guest physical address 0 (valid memory, refused there), and the
//! areas of the rings, so that a request that would write into them can be refused.
//!
//! Every access goes through vm-memory's checked accessors: a bad address is an error, never a
//! fault. Nothing here is trusted: `size` is checked by whoever sets it (a power of two), and
//! the areas by [`SplitRing::check`] before the first use.

use std::sync::atomic::{fence, Ordering};

use smallvec::SmallVec;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::virtio_blk::Descriptor;

const DESC_SIZE: u64 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// `used.flags`: the device asks not to be kicked (without EVENT_IDX).
const USED_F_NO_NOTIFY: u16 = 1;

/// The descriptors of one chain; most requests have a handful.
pub type Chain = SmallVec<[Descriptor; 8]>;

/// Why a queue cannot go on: each of these means the driver (or the VMM) broke the ring, and
/// the queue stops until it is set up again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    /// An area of the ring is not (wholly) in guest memory, or misaligned.
    Area(String),
    /// The avail index moved by more than the queue size since the last entry taken.
    AvailJump { avail: u16, next: u16, size: u16 },
    /// Guest memory could not be read or written where the ring lives.
    Memory(String),
}

impl std::fmt::Display for RingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingError::Area(s) | RingError::Memory(s) => f.write_str(s),
            RingError::AvailJump { avail, next, size } => write!(
                f,
                "the avail index is {avail} while the next entry is {next}: more than the queue size {size} ahead"
            ),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SplitRing {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    pub event_idx: bool,
    next_avail: u16,
    next_used: u16,
    /// Used entries added since the last notification decision (EVENT_IDX).
    num_added: u16,
}

/// The address of a field `off` bytes into an area at `base`. The areas are checked before
/// the queue runs ([`SplitRing::check`]), but not every path that touches a field can rely on
/// that (a VMM may send a call fd or a restart for a ring it never set up right): an address
/// that would wrap is an error, not a read of some other place.
fn field(what: &str, base: GuestAddress, off: u64) -> Result<GuestAddress, RingError> {
    base.0.checked_add(off).map(GuestAddress).ok_or_else(|| {
        RingError::Memory(format!(
            "{what} at {:#x}+{off:#x}: past the end of the address space",
            base.0
        ))
    })
}

fn mem_err(what: &str, at: GuestAddress, e: impl std::fmt::Display) -> RingError {
    RingError::Memory(format!("{what} at {:#x}: {e}", at.0))
}

impl SplitRing {
    pub fn new(size: u16) -> SplitRing {
        SplitRing {
            size,
            desc: GuestAddress(0),
            avail: GuestAddress(0),
            used: GuestAddress(0),
            event_idx: false,
            next_avail: 0,
            next_used: 0,
            num_added: 0,
        }
    }

    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    pub fn set_next_avail(&mut self, v: u16) {
        self.next_avail = v;
    }

    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    pub fn set_next_used(&mut self, v: u16) {
        self.next_used = v;
        self.num_added = 0;
    }

    /// The three areas: (name, start, length in bytes).
    pub fn areas(&self) -> [(&'static str, GuestAddress, u64); 3] {
        let n = u64::from(self.size);
        [
            ("descriptor table", self.desc, DESC_SIZE * n),
            ("avail ring", self.avail, 6 + 2 * n),
            ("used ring", self.used, 6 + 8 * n),
        ]
    }

    /// Checks that every area is aligned (§2.7) and wholly in guest memory.
    pub fn check(&self, mem: &GuestMemoryMmap) -> Result<(), RingError> {
        if self.size == 0 || !self.size.is_power_of_two() {
            return Err(RingError::Area(format!("queue size {}", self.size)));
        }
        for ((name, at, len), align) in self.areas().into_iter().zip([16u64, 2, 4]) {
            if at.0 % align != 0 {
                return Err(RingError::Area(format!(
                    "{name} at {:#x} is not {align}-byte aligned",
                    at.0
                )));
            }
            if !mem.check_range(at, len as usize, vm_memory::Permissions::ReadWrite) {
                return Err(RingError::Area(format!(
                    "{name} at {:#x}+{len:#x} is not in guest memory",
                    at.0
                )));
            }
        }
        Ok(())
    }

    /// True if `[addr, addr + len)` overlaps one of the ring's areas.
    pub fn overlaps(&self, addr: GuestAddress, len: u64) -> bool {
        let end = addr.0.saturating_add(len);
        self.areas()
            .iter()
            .any(|&(_, at, n)| addr.0 < at.0.saturating_add(n) && at.0 < end)
    }

    pub fn avail_idx(&self, mem: &GuestMemoryMmap) -> Result<u16, RingError> {
        let at = field("avail index", self.avail, 2)?;
        mem.load::<u16>(at, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|e| mem_err("avail index", at, e))
    }

    /// The used index as the ring holds it.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> Result<u16, RingError> {
        let at = field("used index", self.used, 2)?;
        mem.load::<u16>(at, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|e| mem_err("used index", at, e))
    }

    /// Takes the next available head, if any.
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Result<Option<u16>, RingError> {
        let avail = self.avail_idx(mem)?;
        let pending = avail.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(RingError::AvailJump {
                avail,
                next: self.next_avail,
                size: self.size,
            });
        }
        let at = field(
            "avail entry",
            self.avail,
            4 + 2 * u64::from(self.next_avail % self.size),
        )?;
        let head = mem
            .load::<u16>(at, Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|e| mem_err("avail entry", at, e))?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(head))
    }

    /// Puts `head` on the used ring with `len` bytes written, and publishes the new used index.
    pub fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), RingError> {
        let slot = u64::from(self.next_used % self.size);
        // `next_used` moves only once the driver can see the entry: a used index outside guest
        // memory fails the call with the device's count unchanged.
        let at = field("used entry", self.used, 4 + 8 * slot)?;
        let idx = field("used index", self.used, 2)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, at)
            .map_err(|e| mem_err("used entry", at, e))?;
        let next = self.next_used.wrapping_add(1);
        mem.store(next.to_le(), idx, Ordering::Release)
            .map_err(|e| mem_err("used index", idx, e))?;
        self.next_used = next;
        self.num_added = self.num_added.wrapping_add(1);
        Ok(())
    }

    /// Whether the driver wants an interrupt for what was added since the last call.
    pub fn needs_notification(&mut self, mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        fence(Ordering::SeqCst);
        let added = std::mem::take(&mut self.num_added);
        if self.event_idx {
            let at = field("used_event", self.avail, 4 + 2 * u64::from(self.size))?;
            let used_event = mem
                .load::<u16>(at, Ordering::Relaxed)
                .map(u16::from_le)
                .map_err(|e| mem_err("used_event", at, e))?;
            // virtio 1.2 §2.7.10: notify if used_event lies in [old, new), i.e. the entry at
            // index used_event is one of those just added.
            let new = self.next_used;
            let old = new.wrapping_sub(added);
            return Ok(new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old));
        }
        let flags = mem
            .load::<u16>(self.avail, Ordering::Relaxed)
            .map(u16::from_le)
            .map_err(|e| mem_err("avail flags", self.avail, e))?;
        // VRING_AVAIL_F_NO_INTERRUPT: the driver polls and asks for no interrupt (QEMU too
        // honours it).
        Ok(flags & 1 == 0)
    }

    fn set_notification(&mut self, mem: &GuestMemoryMmap, enable: bool) -> Result<(), RingError> {
        if self.event_idx {
            if enable {
                let at = field("avail_event", self.used, 4 + 8 * u64::from(self.size))?;
                mem.store(self.next_avail.to_le(), at, Ordering::Relaxed)
                    .map_err(|e| mem_err("avail_event", at, e))?;
            }
            return Ok(());
        }
        let flags = if enable { 0 } else { USED_F_NO_NOTIFY };
        mem.store(flags.to_le(), self.used, Ordering::Relaxed)
            .map_err(|e| mem_err("used flags", self.used, e))
    }

    /// Asks the driver for kicks again; true if entries arrived meanwhile (process them).
    pub fn enable_notification(&mut self, mem: &GuestMemoryMmap) -> Result<bool, RingError> {
        self.set_notification(mem, true)?;
        fence(Ordering::SeqCst);
        Ok(self.avail_idx(mem)? != self.next_avail)
    }

    pub fn disable_notification(&mut self, mem: &GuestMemoryMmap) -> Result<(), RingError> {
        self.set_notification(mem, false)
    }

    /// The descriptors of the chain starting at `head` (see [`walk_chain`]).
    pub fn chain(&self, mem: &GuestMemoryMmap, head: u16) -> Chain {
        walk_chain(mem, self.desc, self.size, head)
    }
}

/// Follows a descriptor chain from `head` in the table at `table` of `size` entries, through
/// at most one indirect table. The walk ends (keeping what it has) at the first descriptor
/// that cannot be right: an index past its table, a table not in memory, a nested or
/// misshapen indirect table, more descriptors than the table holds (a loop), or a total
/// length past 4 GiB (virtio 1.2 §2.7.5.2). The request parser then decides what is left.
pub fn walk_chain(mem: &GuestMemoryMmap, table: GuestAddress, size: u16, head: u16) -> Chain {
    let mut out = Chain::new();
    let (mut table, mut size, mut next, mut ttl) = (table, size, head, size);
    let mut indirect = false;
    let mut total: u32 = 0;
    loop {
        if ttl == 0 || next >= size {
            return out;
        }
        let Some(at) = table.0.checked_add(DESC_SIZE * u64::from(next)) else {
            return out;
        };
        let mut raw = [0u8; 16];
        if mem.read_slice(&mut raw, GuestAddress(at)).is_err() {
            return out;
        }
        let addr = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes(raw[12..14].try_into().expect("2 bytes"));
        let link = u16::from_le_bytes(raw[14..16].try_into().expect("2 bytes"));
        if flags & F_INDIRECT != 0 {
            let entries = len / DESC_SIZE as u32;
            if indirect || len % DESC_SIZE as u32 != 0 || entries > u32::from(u16::MAX) {
                return out;
            }
            table = GuestAddress(addr);
            size = entries as u16;
            next = 0;
            ttl = size;
            indirect = true;
            continue;
        }
        let Some(t) = total.checked_add(len) else {
            return out;
        };
        total = t;
        if flags & F_NEXT != 0 {
            next = link;
            ttl -= 1;
        } else {
            ttl = 0;
        }
        out.push(Descriptor {
            addr: GuestAddress(addr),
            len,
            writable: flags & F_WRITE != 0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn ring(size: u16) -> SplitRing {
        let mut r = SplitRing::new(size);
        r.desc = GuestAddress(0);
        r.avail = GuestAddress(0x1000);
        r.used = GuestAddress(0x2000);
        r
    }

    fn put_desc(
        m: &GuestMemoryMmap,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        m.write_slice(&raw, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    #[test]
    fn a_ring_at_address_zero_is_served() {
        let m = mem();
        let mut r = ring(8);
        r.check(&m).unwrap();
        m.write_obj(3u16, GuestAddress(0x1004)).unwrap();
        m.write_obj(1u16, GuestAddress(0x1002)).unwrap();
        assert_eq!(r.pop(&m), Ok(Some(3)));
        assert_eq!(r.pop(&m), Ok(None));
        r.add_used(&m, 3, 9).unwrap();
        assert_eq!(r.used_idx(&m), Ok(1));
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x2004)).unwrap(), 3);
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x2008)).unwrap(), 9);
    }

    #[test]
    fn an_avail_jump_is_an_error_every_time_not_a_loop() {
        let m = mem();
        let mut r = ring(8);
        m.write_obj(9u16, GuestAddress(0x1002)).unwrap();
        for _ in 0..3 {
            assert!(matches!(r.pop(&m), Err(RingError::AvailJump { .. })));
        }
        assert_eq!(r.next_avail(), 0);
    }

    #[test]
    fn areas_outside_memory_or_misaligned_are_refused() {
        let m = mem();
        let mut r = ring(256);
        r.used = GuestAddress((1 << 20) - 8);
        assert!(r.check(&m).is_err());
        let mut r = ring(256);
        r.desc = GuestAddress(8);
        assert!(r.check(&m).is_err());
        assert!(ring(256).check(&m).is_ok());
    }

    #[test]
    fn overlap_with_each_area() {
        let r = ring(8);
        assert!(r.overlaps(GuestAddress(0x7f), 2));
        assert!(!r.overlaps(GuestAddress(0x80), 0x100));
        assert!(r.overlaps(GuestAddress(0x1000 + 21), 1));
        assert!(!r.overlaps(GuestAddress(0x1000 + 22), 1));
        assert!(r.overlaps(GuestAddress(0x1fff), 2));
        assert!(!r.overlaps(GuestAddress(0x2000 + 70), 100));
    }

    #[test]
    fn chains_direct_indirect_and_looping() {
        let m = mem();
        let r = ring(8);
        put_desc(&m, 0, 0, 0x8000, 16, F_NEXT, 1);
        put_desc(&m, 0, 1, 0x9000, 512, F_WRITE | F_NEXT, 2);
        put_desc(&m, 0, 2, 0xa000, 1, F_WRITE, 0);
        let c = r.chain(&m, 0);
        assert_eq!(c.len(), 3);
        assert!(!c[0].writable && c[1].writable && c[2].len == 1);
        // A loop ends after `size` descriptors.
        put_desc(&m, 0, 3, 0x8000, 16, F_NEXT, 3);
        assert_eq!(r.chain(&m, 3).len(), 8);
        // Indirect, and a nested indirect that ends the walk.
        put_desc(&m, 0x4000, 0, 0x8000, 16, F_NEXT, 1);
        put_desc(&m, 0x4000, 1, 0xa000, 1, F_WRITE, 0);
        put_desc(&m, 0, 4, 0x4000, 32, F_INDIRECT, 0);
        assert_eq!(r.chain(&m, 4).len(), 2);
        put_desc(&m, 0x4000, 1, 0x4000, 32, F_INDIRECT, 0);
        assert_eq!(r.chain(&m, 4).len(), 1);
        // A head past the table: nothing.
        assert!(r.chain(&m, 8).is_empty());
    }
}
