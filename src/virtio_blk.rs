//! virtio-blk requests: from a descriptor chain to a checked, typed [`Request`] (virtio 1.2
//! §5.2.6). Pure: no image, no socket, no `unsafe`; unit-tested and fuzzable on its own.
//!
//! Nothing the guest sends is trusted. A request's header may be split across descriptors
//! (any layout), data may take any number of segments (seg_max is advice the guest may
//! ignore), and the status byte is the last device-writable byte. A chain without a writable
//! byte cannot even be answered: it is completed with no status (used length 0).

use smallvec::SmallVec;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Request types (virtio_blk.h).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// virtio-blk counts in 512-byte sectors whatever the logical block size.
pub const SECTOR_SHIFT: u32 = 9;
pub const HEADER_LEN: u64 = 16;
/// One discard / write-zeroes range: sector (u64), num_sectors (u32), flags (u32).
pub const RANGE_LEN: u64 = 16;
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// The serial a GET_ID request returns is at most this long.
pub const ID_LEN: usize = 20;

/// One descriptor of a chain, as the queue gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

/// A run of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u64,
}

/// A request's runs of guest memory: nearly always a few, kept off the heap.
pub type Segments = SmallVec<[Segment; 4]>;

/// A discard or write-zeroes range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Read into the device-writable data segments.
    In,
    /// Write from the device-readable data segments.
    Out,
    Flush,
    GetId,
    Discard(Vec<Range>),
    WriteZeroes(Vec<Range>),
    /// A type this device does not implement: answered UNSUPP.
    Unsupported(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    /// In 512-byte units, as the header gave it.
    pub sector: u64,
    /// For In: where the data goes; for Out: where it comes from; for GetId: the id buffer.
    pub data: Segments,
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// No device-writable byte: there is nowhere to put a status.
    NoStatus,
    /// Answer IOERR at `status`: the reason is for the log.
    Bad {
        status: GuestAddress,
        reason: String,
    },
}

/// The most ranges a discard or write-zeroes request may carry (what the config space says);
/// more is refused before anything is read.
pub const MAX_RANGES: u32 = 64;

/// Splits the device-readable part `[from, from + len)` of `segs` into segments.
fn sub_segments(segs: &[Segment], mut from: u64, mut len: u64) -> Segments {
    let mut out = Segments::new();
    for s in segs {
        if len == 0 {
            break;
        }
        if from >= s.len {
            from -= s.len;
            continue;
        }
        let n = (s.len - from).min(len);
        out.push(Segment {
            // A descriptor may claim to run past the end of the address space: the address
            // saturates, and is refused where it is used (never in guest memory).
            addr: GuestAddress(s.addr.0.saturating_add(from)),
            len: n,
        });
        len -= n;
        from = 0;
    }
    out
}

/// Copies `buf.len()` bytes starting `from` bytes into `segs`.
fn read_from_segments(
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    from: u64,
    buf: &mut [u8],
) -> Result<(), String> {
    let mut at = 0usize;
    for s in sub_segments(segs, from, buf.len() as u64) {
        let n = s.len as usize;
        mem.read_slice(&mut buf[at..at + n], s.addr)
            .map_err(|e| format!("cannot read guest memory at {:#x}: {e}", s.addr.0))?;
        at += n;
    }
    if at < buf.len() {
        return Err("the chain ends early".into());
    }
    Ok(())
}

/// Parses one descriptor chain.
pub fn parse(descs: &[Descriptor], mem: &GuestMemoryMmap) -> Result<Request, Malformed> {
    // Device-readable descriptors come first, then device-writable ones (§2.7.4.2); a readable
    // descriptor after a writable one makes the layout ambiguous.
    let mut readable = Segments::new();
    let mut writable = Segments::new();
    for d in descs {
        let seg = Segment {
            addr: d.addr,
            len: u64::from(d.len),
        };
        if d.len == 0 {
            continue;
        }
        if d.writable {
            writable.push(seg);
        } else {
            if !writable.is_empty() {
                let status = last_byte(&writable).ok_or(Malformed::NoStatus)?;
                return Err(Malformed::Bad {
                    status,
                    reason: "a device-readable descriptor follows a device-writable one".into(),
                });
            }
            readable.push(seg);
        }
    }
    let status = last_byte(&writable).ok_or(Malformed::NoStatus)?;
    let bad = |reason: String| Malformed::Bad { status, reason };
    // Guest addresses must exist: `status` is checked when it is written; here the data.
    let readable_len: u64 = readable.iter().map(|s| s.len).sum();
    let writable_len: u64 = writable.iter().map(|s| s.len).sum::<u64>() - 1;
    if readable_len < HEADER_LEN {
        return Err(bad(format!(
            "the request header needs {HEADER_LEN} device-readable bytes, the chain has {readable_len}"
        )));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    read_from_segments(mem, &readable, 0, &mut header).map_err(bad)?;
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let payload_len = readable_len - HEADER_LEN;
    let (kind, data, data_len) = match kind {
        VIRTIO_BLK_T_IN => (
            Kind::In,
            sub_segments(&writable, 0, writable_len),
            writable_len,
        ),
        VIRTIO_BLK_T_OUT => (
            Kind::Out,
            sub_segments(&readable, HEADER_LEN, payload_len),
            payload_len,
        ),
        VIRTIO_BLK_T_FLUSH => (Kind::Flush, Segments::new(), 0),
        VIRTIO_BLK_T_GET_ID => (
            Kind::GetId,
            sub_segments(&writable, 0, writable_len),
            writable_len,
        ),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if payload_len == 0 || payload_len % RANGE_LEN != 0 {
                return Err(bad(format!(
                    "discard/write-zeroes payload of {payload_len} bytes is not a whole number of 16-byte ranges"
                )));
            }
            let count = payload_len / RANGE_LEN;
            if count > u64::from(MAX_RANGES) {
                return Err(bad(format!(
                    "{count} discard/write-zeroes ranges, more than the {MAX_RANGES} allowed"
                )));
            }
            let mut ranges = Vec::with_capacity(count as usize);
            for i in 0..count {
                let mut r = [0u8; RANGE_LEN as usize];
                read_from_segments(mem, &readable, HEADER_LEN + i * RANGE_LEN, &mut r)
                    .map_err(bad)?;
                ranges.push(Range {
                    sector: u64::from_le_bytes(r[0..8].try_into().expect("8 bytes")),
                    num_sectors: u32::from_le_bytes(r[8..12].try_into().expect("4 bytes")),
                    flags: u32::from_le_bytes(r[12..16].try_into().expect("4 bytes")),
                });
            }
            let k = if kind == VIRTIO_BLK_T_DISCARD {
                Kind::Discard(ranges)
            } else {
                Kind::WriteZeroes(ranges)
            };
            (k, Segments::new(), 0)
        }
        other => (Kind::Unsupported(other), Segments::new(), 0),
    };
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status,
    })
}

fn last_byte(writable: &[Segment]) -> Option<GuestAddress> {
    let last = writable.last()?;
    Some(GuestAddress(last.addr.0.checked_add(last.len - 1)?))
}

/// The byte range of the disk a request touches, checked against the disk: `Err` is the
/// reason for an IOERR.
pub fn disk_range(sector: u64, len: u64, capacity: u64, block: u64) -> Result<(u64, u64), String> {
    let offset = sector
        .checked_mul(1 << SECTOR_SHIFT)
        .ok_or_else(|| format!("sector {sector} overflows"))?;
    let end = offset
        .checked_add(len)
        .ok_or_else(|| format!("sector {sector} + {len} bytes overflows"))?;
    if end > capacity {
        return Err(format!(
            "{len} bytes at sector {sector} end past the disk ({capacity} bytes)"
        ));
    }
    if offset % block != 0 || len % block != 0 {
        return Err(format!(
            "{len} bytes at sector {sector} are not aligned to the {block}-byte block"
        ));
    }
    Ok((offset, len))
}
