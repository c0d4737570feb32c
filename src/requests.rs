//! Serving one virtio-blk request against the VHDX chain: parse it, check it, run it, and
//! write its status. Everything here is per request and shared by the queue threads and the
//! helper threads; the rings themselves are [`crate::backend`]'s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::{debug, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::guest_io::{write_to_segments, GuestBuffers};
use crate::guest_memory;
use crate::queue::{Outcome, Popped};
use crate::vhdx::Chain;
use crate::virtio_blk::{self, Descriptor, Kind, Malformed, Range};

/// The most sectors one discard / write-zeroes range may cover (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> 9;

pub struct Requests {
    pub chain: Arc<Chain>,
    pub read_only: bool,
    /// GET_ID answer; at most 20 bytes are used.
    pub serial: String,
    /// Flush after every write (the guest sees a write-through cache).
    pub writethrough: AtomicBool,
}

/// Why a request did not succeed.
enum Failed {
    /// Answered with this status.
    Status(u8),
    /// Not run: it would write into the queue's rings.
    IntoRings(String),
}

/// True if guest memory `[addr, addr + len)` overlaps one of `areas`.
pub(crate) fn overlaps(areas: &[(GuestAddress, u64)], addr: GuestAddress, len: u64) -> bool {
    let end = addr.0.saturating_add(len);
    areas
        .iter()
        .any(|&(at, n)| addr.0 < at.0.saturating_add(n) && at.0 < end)
}

impl Requests {
    /// Runs a request popped from a queue.
    pub fn run_popped(&self, p: &Popped) -> Outcome {
        match self.execute_outside(&p.mem, &p.descs, &p.rings) {
            Ok(used) => Outcome::Used(used),
            Err(why) => Outcome::Broken(why),
        }
    }

    /// Overwrites the status of a request that ran with IOERR: it cannot be reported done
    /// after all (its metadata could not be committed).
    pub fn fail_status(&self, p: &Popped) {
        if let Ok(req) = virtio_blk::parse(&p.descs, &p.mem) {
            self.complete(&p.mem, req.status, virtio_blk::VIRTIO_BLK_S_IOERR, 0);
        }
    }

    /// Runs one request; returns the used length (bytes written to the guest).
    pub fn execute(&self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> u32 {
        self.execute_outside(mem, descs, &[]).unwrap_or(0)
    }

    /// Runs one request unless it would write into `forbidden` (the queue's rings: a driver
    /// that reads disk data into its own rings breaks them): then `Err`, and nothing is done.
    pub fn execute_outside(
        &self,
        mem: &GuestMemoryMmap,
        descs: &[Descriptor],
        forbidden: &[(GuestAddress, u64)],
    ) -> Result<u32, String> {
        let req = match virtio_blk::parse(descs, mem) {
            Ok(r) => r,
            Err(Malformed::NoStatus) => {
                debug!("request without a status byte: dropped");
                return Ok(0);
            }
            Err(Malformed::Bad { status, reason }) => {
                if overlaps(forbidden, status, 1) {
                    return Err(format!(
                        "a request's status byte at {:#x} is in the rings",
                        status.0
                    ));
                }
                debug!("malformed request: {reason}");
                return Ok(self.complete(mem, status, virtio_blk::VIRTIO_BLK_S_IOERR, 0));
            }
        };
        if overlaps(forbidden, req.status, 1) {
            return Err(format!(
                "a request's status byte at {:#x} is in the rings",
                req.status.0
            ));
        }

        // A request whose status cannot be reported is not run at all.
        if !vm_memory::GuestMemory::check_range(mem, req.status, 1, vm_memory::Permissions::Write) {
            debug!(
                "status byte at {:#x} is not in guest memory: dropped",
                req.status.0
            );
            return Ok(0);
        }
        let faults = guest_memory::faults();
        let (mut status, mut written) = match self.run(mem, &req, forbidden) {
            Ok(written) => (virtio_blk::VIRTIO_BLK_S_OK, written),
            Err(Failed::Status(status)) => (status, 0),
            Err(Failed::IntoRings(why)) => return Err(why),
        };
        if guest_memory::faults() != faults {
            // Guest memory under this request (or another one) vanished: what it read or wrote
            // there cannot be trusted.
            warn!("guest memory faulted during a request: failed");
            (status, written) = (virtio_blk::VIRTIO_BLK_S_IOERR, 0);
        }
        Ok(self.complete(mem, req.status, status, written))
    }

    fn complete(
        &self,
        mem: &GuestMemoryMmap,
        at: vm_memory::GuestAddress,
        status: u8,
        written: u32,
    ) -> u32 {
        if mem.write_obj(status, at).is_err() {
            debug!("status byte at {:#x} is not in guest memory", at.0);
            return 0;
        }
        written.saturating_add(1)
    }

    fn capacity(&self) -> u64 {
        self.chain.virtual_size()
    }

    fn block(&self) -> u64 {
        u64::from(self.chain.logical_sector_size())
    }

    fn ioerr(context: &str, e: impl std::fmt::Display) -> Failed {
        warn!("{context}: {e}");
        Failed::Status(virtio_blk::VIRTIO_BLK_S_IOERR)
    }

    /// Executes a parsed request: `Ok(bytes written to the guest)` or why not.
    fn run(
        &self,
        mem: &GuestMemoryMmap,
        req: &virtio_blk::Request,
        forbidden: &[(GuestAddress, u64)],
    ) -> Result<u32, Failed> {
        // Data about to be written into guest memory must not land in the rings.
        let into_rings = || -> Result<(), Failed> {
            match req.data.iter().find(|s| overlaps(forbidden, s.addr, s.len)) {
                Some(s) => Err(Failed::IntoRings(format!(
                    "a request's data buffer {:#x}+{:#x} overlaps the rings",
                    s.addr.0, s.len
                ))),
                None => Ok(()),
            }
        };
        let ro = self.read_only;
        match &req.kind {
            Kind::In => {
                let (offset, _) =
                    virtio_blk::disk_range(req.sector, req.data_len, self.capacity(), self.block())
                        .map_err(|e| Self::ioerr("read", e))?;
                into_rings()?;
                let mut buffers =
                    GuestBuffers::new(mem, &req.data).map_err(|e| Self::ioerr("read", e))?;
                self.chain
                    .read(offset, &mut buffers)
                    .map_err(|e| Self::ioerr("read", e))?;
                Ok(u32::try_from(req.data_len).unwrap_or(u32::MAX))
            }
            Kind::Out => {
                if ro {
                    return Err(Failed::Status(virtio_blk::VIRTIO_BLK_S_IOERR));
                }
                let (offset, _) =
                    virtio_blk::disk_range(req.sector, req.data_len, self.capacity(), self.block())
                        .map_err(|e| Self::ioerr("write", e))?;
                let buffers =
                    GuestBuffers::new(mem, &req.data).map_err(|e| Self::ioerr("write", e))?;
                self.chain
                    .write(offset, &buffers)
                    .map_err(|e| Self::ioerr("write", e))?;
                if self.writethrough.load(Ordering::Relaxed) {
                    self.chain.flush().map_err(|e| Self::ioerr("flush", e))?;
                }
                Ok(0)
            }
            Kind::Flush => {
                self.chain.flush().map_err(|e| Self::ioerr("flush", e))?;
                Ok(0)
            }
            Kind::GetId => {
                let mut id = [0u8; virtio_blk::ID_LEN];
                let serial = self.serial.as_bytes();
                let n = serial.len().min(id.len());
                id[..n].copy_from_slice(&serial[..n]);
                // An id buffer outside guest memory is an error, not a silent short answer.
                GuestBuffers::new(mem, &req.data).map_err(|e| Self::ioerr("get id", e))?;
                into_rings()?;
                Ok(write_to_segments(mem, &req.data, &id) as u32)
            }
            Kind::Discard(ranges) => {
                if ro {
                    return Err(Failed::Status(virtio_blk::VIRTIO_BLK_S_IOERR));
                }
                self.trim(ranges, false)
            }
            Kind::WriteZeroes(ranges) => {
                if ro {
                    return Err(Failed::Status(virtio_blk::VIRTIO_BLK_S_IOERR));
                }
                self.trim(ranges, true)
            }
            Kind::Unsupported(t) => {
                debug!("unsupported request type {t}");
                Err(Failed::Status(virtio_blk::VIRTIO_BLK_S_UNSUPP))
            }
        }
    }

    fn trim(&self, ranges: &[Range], zero: bool) -> Result<u32, Failed> {
        // Check every range before changing anything.
        let mut checked = Vec::with_capacity(ranges.len());
        for r in ranges {
            let allowed = if zero {
                virtio_blk::WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if r.flags & !allowed != 0 {
                return Err(Failed::Status(virtio_blk::VIRTIO_BLK_S_UNSUPP));
            }
            if r.num_sectors > MAX_DISCARD_SECTORS {
                return Err(Self::ioerr("trim", "range larger than max_discard_sectors"));
            }
            let len = u64::from(r.num_sectors) << virtio_blk::SECTOR_SHIFT;
            checked.push(
                virtio_blk::disk_range(r.sector, len, self.capacity(), self.block())
                    .map_err(|e| Self::ioerr("trim", e))?,
            );
        }
        for (offset, len) in checked {
            let r = if zero {
                self.chain.write_zeroes(offset, len)
            } else {
                self.chain.discard(offset, len)
            };
            r.map_err(|e| Self::ioerr("trim", e))?;
        }
        if self.writethrough.load(Ordering::Relaxed) {
            self.chain.flush().map_err(|e| Self::ioerr("flush", e))?;
        }
        Ok(0)
    }
}
