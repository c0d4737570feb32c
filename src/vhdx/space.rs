//! Free-space management of a writable file: where new blocks go, and when freed space may be
//! used again.
//!
//! Every extent is 1 MiB-aligned. Space comes from three places, in order of preference:
//! - *free* extents: space no structure uses. Its old contents are unknown, so whoever takes it
//!   must write every byte the new owner promises (data or zeros) before the BAT points there.
//! - the *fresh* tail: between the end of the last structure and the physical end of the file.
//!   The file is grown in large steps and truncated to its last structure when opened for
//!   writing, so fresh space is known to read as zeros.
//! - growing the file.
//!
//! Space freed by a trim goes to a *pending* list first and becomes free only when the WAL says
//! the BAT change that freed it is durable (design rule 5): before that, a crash would bring back
//! the old BAT entry pointing at the space.

use std::collections::BTreeMap;

use super::format::{align_up, MIB};

/// The file grows by an eighth of its size at a time, at least `MIN_GROW_STEP` and at most
/// `MAX_GROW_STEP` (and always by at least the allocation), so that first-touch writes do not
/// extend the file one block at a time, and a small file does not balloon.
pub const MIN_GROW_STEP: u64 = 32 * MIB;
pub const MAX_GROW_STEP: u64 = 256 * MIB;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub offset: u64,
    /// The space is known to read as zeros (fresh tail); otherwise its old contents must be
    /// overwritten before anything points at it.
    pub zeroed: bool,
}

#[derive(Debug)]
pub struct FreeSpace {
    /// offset → length of free extents, never adjacent (merged).
    free: BTreeMap<u64, u64>,
    /// Freed extents waiting for the WAL generation in which their BAT change is durable.
    pending: Vec<(u64, u64, u64)>,
    /// End of the last structure: everything at or past it is fresh.
    used_end: u64,
    /// Length of the file.
    file_end: u64,
}

impl FreeSpace {
    /// `used` are the extents structures occupy (any order); `file_end` the file length, which
    /// the caller has truncated to the used end (rounded up to 1 MiB) at open.
    pub fn new(used: &[(u64, u64)], file_end: u64) -> FreeSpace {
        let mut sorted: Vec<(u64, u64)> = used.to_vec();
        sorted.sort_unstable();
        let mut free = BTreeMap::new();
        let mut pos = 0;
        for (start, len) in sorted {
            if start > pos {
                free.insert(pos, start - pos);
            }
            pos = pos.max(start + len);
        }
        FreeSpace {
            free,
            pending: Vec::new(),
            used_end: pos,
            file_end: file_end.max(pos),
        }
    }

    /// Takes `len` bytes (a multiple of 1 MiB). Returns the allocation and, when the file must
    /// grow first, the new file length.
    pub fn allocate(&mut self, len: u64) -> (Allocation, Option<u64>) {
        debug_assert_eq!(len % MIB, 0);
        let found = self
            .free
            .iter()
            .find(|(_, &l)| l >= len)
            .map(|(&o, &l)| (o, l));
        if let Some((offset, extent_len)) = found {
            self.free.remove(&offset);
            if extent_len > len {
                self.free.insert(offset + len, extent_len - len);
            }
            return (
                Allocation {
                    offset,
                    zeroed: false,
                },
                None,
            );
        }
        let offset = self.used_end;
        self.used_end += len;
        let grow = (self.used_end > self.file_end).then(|| {
            let step = (self.file_end / 8 / MIB * MIB)
                .clamp(MIN_GROW_STEP, MAX_GROW_STEP)
                .max(len);
            self.file_end = (offset + step).max(self.used_end);
            self.file_end
        });
        (
            Allocation {
                offset,
                zeroed: true,
            },
            grow,
        )
    }

    /// Marks an extent as no longer used once WAL generation `generation` is durable.
    pub fn release(&mut self, offset: u64, len: u64, generation: u64) {
        self.pending.push((offset, len, generation));
    }

    /// Moves every pending extent whose generation is durable to the free list.
    pub fn durable(&mut self, generation: u64) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].2 <= generation {
                let (o, l, _) = self.pending.swap_remove(i);
                self.insert_free(o, l);
            } else {
                i += 1;
            }
        }
    }

    fn insert_free(&mut self, mut offset: u64, mut len: u64) {
        if let Some((&prev, &plen)) = self.free.range(..offset).next_back() {
            if prev + plen == offset {
                self.free.remove(&prev);
                offset = prev;
                len += plen;
            }
        }
        if let Some(&next_len) = self.free.get(&(offset + len)) {
            self.free.remove(&(offset + len));
            len += next_len;
        }
        self.free.insert(offset, len);
    }

    /// Where the file may end once free space at its end is given back (clean close).
    pub fn trimmed_end(&self) -> u64 {
        let mut end = self.used_end;
        while let Some((&o, &l)) = self.free.range(..end).next_back() {
            if o + l == end {
                end = o;
            } else {
                break;
            }
        }
        end
    }

    /// The shortest a fixed file (LeaveBlockAllocated) may be: room for `unallocated_blocks`
    /// more blocks, in the gaps between structures first, then past the end ([MS-VHDX]
    /// §2.6.2.1: such a file must not shrink below what allocating every block needs). qemu's
    /// fixed files (`block_state_zero=on`, its default) are ZERO blocks without space over a
    /// file of full length.
    pub fn fixed_min_len(&self, unallocated_blocks: u64, block_size: u64) -> u64 {
        let end = self.trimmed_end();
        let fit: u64 = self.free.range(..end).map(|(_, &l)| l / block_size).sum();
        align_up(end, MIB).unwrap_or(end) + unallocated_blocks.saturating_sub(fit) * block_size
    }

    pub fn file_end(&self) -> u64 {
        self.file_end
    }

    pub fn used_end(&self) -> u64 {
        self.used_end
    }

    pub fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_between_structures_are_free_and_reused_first() {
        // Header section, log, BAT, metadata at 0–4 MiB, a block at 8–40 MiB: 4–8 MiB is free.
        let mut s = FreeSpace::new(&[(0, 4 * MIB), (8 * MIB, 32 * MIB)], 40 * MIB);
        assert_eq!(s.free_bytes(), 4 * MIB);
        let (a, grow) = s.allocate(MIB);
        assert_eq!(
            a,
            Allocation {
                offset: 4 * MIB,
                zeroed: false
            }
        );
        assert_eq!(grow, None);
        let (a, grow) = s.allocate(8 * MIB);
        assert_eq!(
            a,
            Allocation {
                offset: 40 * MIB,
                zeroed: true
            }
        );
        assert_eq!(grow, Some(40 * MIB + MIN_GROW_STEP));
        // The next block fits in the grown tail without growing again.
        let (a, grow) = s.allocate(8 * MIB);
        assert_eq!(a.offset, 48 * MIB);
        assert_eq!(grow, None);
    }

    #[test]
    fn freed_space_waits_for_durability() {
        let mut s = FreeSpace::new(&[(0, 4 * MIB), (4 * MIB, 32 * MIB)], 36 * MIB);
        s.release(4 * MIB, 32 * MIB, 7);
        s.durable(6);
        assert_eq!(s.free_bytes(), 0);
        assert!(s.allocate(32 * MIB).0.zeroed);
        s.durable(7);
        assert_eq!(s.free_bytes(), 32 * MIB);
        let (a, _) = s.allocate(32 * MIB);
        assert_eq!(
            a,
            Allocation {
                offset: 4 * MIB,
                zeroed: false
            }
        );
    }

    #[test]
    fn a_fixed_file_keeps_room_for_its_unallocated_blocks() {
        // Structures up to 4 MiB, a 3 MiB gap, a block at 7 MiB.
        let s = FreeSpace::new(&[(0, 4 * MIB), (7 * MIB, MIB)], 8 * MIB);
        assert_eq!(s.fixed_min_len(0, MIB), 8 * MIB);
        // Three 1 MiB blocks fit in the gap; the others go past the end.
        assert_eq!(s.fixed_min_len(3, MIB), 8 * MIB);
        assert_eq!(s.fixed_min_len(5, MIB), 10 * MIB);
        // A 2 MiB block fits in the gap once.
        assert_eq!(s.fixed_min_len(2, 2 * MIB), 10 * MIB);
    }

    #[test]
    fn trailing_free_space_is_trimmed() {
        let mut s = FreeSpace::new(
            &[(0, 4 * MIB), (4 * MIB, 8 * MIB), (12 * MIB, 8 * MIB)],
            20 * MIB,
        );
        s.release(12 * MIB, 8 * MIB, 1);
        s.release(4 * MIB, 8 * MIB, 1);
        s.durable(1);
        assert_eq!(s.trimmed_end(), 4 * MIB);
    }
}
