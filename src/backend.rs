//! The vhost-user-blk device: features, config space, and the queue processing that turns
//! descriptor chains into operations on the VHDX chain.
//!
//! Queue processing (pop, parse, execute, complete) lives in [`BlockDevice::process_queue`]
//! and does not depend on the daemon layer above it, so that a request handler with in-flight
//! tracking (INFLIGHT_SHMFD) can replace vhost-user-backend's later without touching it.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{Immutable, IntoBytes, KnownLayout};

use crate::guest_io::{write_to_segments, GuestBuffers};
use crate::vhdx::Chain;
use crate::virtio_blk::{self, Descriptor, Kind, Malformed, Range};

pub type GuestMemoryType = GuestMemoryAtomic<GuestMemoryMmap>;
pub type Vring = VringRwLock<GuestMemoryType>;

/// Queues offered: QEMU defaults `num-queues` to the vCPU count, so offer plenty.
pub const DEFAULT_NUM_QUEUES: u16 = 16;
pub const DEFAULT_QUEUE_SIZE: usize = 256;
/// Advertised, not trusted: requests with more segments are served anyway.
const SEG_MAX: u32 = 128;
/// The most sectors one discard / write-zeroes range may cover (1 GiB).
const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> 9;

/// virtio_blk_config (virtio 1.2 §5.2.4), the fields up to write_zeroes_may_unmap.
#[derive(Clone, Copy, Debug, Default, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BlockConfig {
    pub capacity: U64,
    pub size_max: U32,
    pub seg_max: U32,
    pub cylinders: U16,
    pub heads: u8,
    pub sectors: u8,
    pub blk_size: U32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: U16,
    pub opt_io_size: U32,
    pub wce: u8,
    pub unused: u8,
    pub num_queues: U16,
    pub max_discard_sectors: U32,
    pub max_discard_seg: U32,
    pub discard_sector_alignment: U32,
    pub max_write_zeroes_sectors: U32,
    pub max_write_zeroes_seg: U32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
}

#[derive(Clone, Debug)]
pub struct DeviceOptions {
    pub read_only: bool,
    pub num_queues: usize,
    pub queue_size: usize,
    /// GET_ID answer; at most 20 bytes are used.
    pub serial: String,
    /// Flush after every write (the guest sees a write-through cache).
    pub writethrough: bool,
}

pub struct BlockDevice {
    chain: Arc<Chain>,
    options: DeviceOptions,
    config: RwLock<BlockConfig>,
    event_idx: AtomicBool,
    writethrough: AtomicBool,
    mem: RwLock<Option<GuestMemoryType>>,
}

impl BlockDevice {
    pub fn new(chain: Arc<Chain>, options: DeviceOptions) -> BlockDevice {
        let lss = chain.logical_sector_size();
        let leaf = chain.leaf();
        let pss = leaf.metadata.physical_sector_size.max(lss);
        let block = leaf.metadata.block_size;
        let block_sectors = block >> virtio_blk::SECTOR_SHIFT;
        let config = BlockConfig {
            capacity: U64::new(chain.virtual_size() >> virtio_blk::SECTOR_SHIFT),
            seg_max: U32::new(SEG_MAX),
            blk_size: U32::new(lss),
            physical_block_exp: (pss / lss).trailing_zeros() as u8,
            min_io_size: U16::new(1),
            opt_io_size: U32::new(block / lss),
            wce: u8::from(!options.writethrough),
            num_queues: U16::new(options.num_queues as u16),
            max_discard_sectors: U32::new(MAX_DISCARD_SECTORS),
            max_discard_seg: U32::new(virtio_blk::MAX_RANGES),
            discard_sector_alignment: U32::new(block_sectors),
            max_write_zeroes_sectors: U32::new(MAX_DISCARD_SECTORS),
            max_write_zeroes_seg: U32::new(virtio_blk::MAX_RANGES),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        };
        BlockDevice {
            writethrough: AtomicBool::new(options.writethrough),
            chain,
            options,
            config: RwLock::new(config),
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
        }
    }

    pub fn chain(&self) -> &Arc<Chain> {
        &self.chain
    }

    pub fn config_bytes(&self) -> Vec<u8> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_bytes()
            .to_vec()
    }

    /// Pops, executes and completes every available request of `vring`.
    pub fn process_queue(&self, vring: &Vring) -> io::Result<()> {
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        loop {
            if self.event_idx.load(Ordering::Relaxed) {
                vring
                    .disable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?;
            }
            let mut completed = 0;
            loop {
                let Some((chain, mem)) = Self::pop(vring, &atomic) else {
                    break;
                };
                let head = chain.head_index();
                let descs: Vec<Descriptor> = chain
                    .map(|d| Descriptor {
                        addr: d.addr(),
                        len: d.len(),
                        writable: d.is_write_only(),
                    })
                    .collect();
                let used = self.execute(&mem, &descs);
                if let Err(e) = vring.add_used(head, used) {
                    // A head index past the end of the queue (a guest bug) has no used slot.
                    // Returning the error would end this queue's worker thread: the queue
                    // would stop serving until the VMM reconnects. Drop the chain instead.
                    warn!("descriptor chain {head} cannot be completed: {e:?}");
                    continue;
                }
                completed += 1;
            }
            if completed > 0
                && vring
                    .needs_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?
            {
                vring.signal_used_queue()?;
            }
            if !self.event_idx.load(Ordering::Relaxed)
                || !vring
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?
            {
                return Ok(());
            }
        }
    }

    /// Pops the next available descriptor chain, with the guest memory to serve it from.
    ///
    /// The memory map can change while the queue is live: a driver adds a region
    /// (ADD_MEM_REG, acknowledged) and then makes a request that uses it available. A snapshot
    /// loaded before the request became visible may lack that region, so the memory is loaded
    /// afresh for each chain, and the pop is redone if the map changed during it.
    fn pop(
        vring: &Vring,
        atomic: &GuestMemoryType,
    ) -> Option<(
        virtio_queue::DescriptorChain<vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap>>,
        vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap>,
    )> {
        let mut state = vring.get_mut();
        let queue = state.get_queue_mut();
        loop {
            let mem = atomic.memory();
            let chain = queue.pop_descriptor_chain(mem.clone())?;
            if std::ptr::eq(&*mem, &*atomic.memory()) {
                return Some((chain, mem));
            }
            queue.go_to_previous_position();
        }
    }

    /// Runs one request; returns the used length (bytes written to the guest).
    pub fn execute(&self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> u32 {
        let req = match virtio_blk::parse(descs, mem) {
            Ok(r) => r,
            Err(Malformed::NoStatus) => {
                debug!("request without a status byte: dropped");
                return 0;
            }
            Err(Malformed::Bad { status, reason }) => {
                debug!("malformed request: {reason}");
                return self.complete(mem, status, virtio_blk::VIRTIO_BLK_S_IOERR, 0);
            }
        };
        // A request whose status cannot be reported is not run at all.
        if !vm_memory::GuestMemory::check_range(mem, req.status, 1, vm_memory::Permissions::Write) {
            debug!(
                "status byte at {:#x} is not in guest memory: dropped",
                req.status.0
            );
            return 0;
        }
        let (status, written) = match self.run(mem, &req) {
            Ok(written) => (virtio_blk::VIRTIO_BLK_S_OK, written),
            Err(status) => (status, 0),
        };
        self.complete(mem, req.status, status, written)
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

    fn ioerr(context: &str, e: impl std::fmt::Display) -> u8 {
        warn!("{context}: {e}");
        virtio_blk::VIRTIO_BLK_S_IOERR
    }

    /// Executes a parsed request: `Ok(bytes written to the guest)` or `Err(status)`.
    fn run(&self, mem: &GuestMemoryMmap, req: &virtio_blk::Request) -> Result<u32, u8> {
        let ro = self.options.read_only;
        match &req.kind {
            Kind::In => {
                let (offset, _) =
                    virtio_blk::disk_range(req.sector, req.data_len, self.capacity(), self.block())
                        .map_err(|e| Self::ioerr("read", e))?;
                let mut buffers =
                    GuestBuffers::new(mem, &req.data).map_err(|e| Self::ioerr("read", e))?;
                self.chain
                    .read(offset, &mut buffers)
                    .map_err(|e| Self::ioerr("read", e))?;
                Ok(u32::try_from(req.data_len).unwrap_or(u32::MAX))
            }
            Kind::Out => {
                if ro {
                    return Err(virtio_blk::VIRTIO_BLK_S_IOERR);
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
                let serial = self.options.serial.as_bytes();
                let n = serial.len().min(id.len());
                id[..n].copy_from_slice(&serial[..n]);
                // An id buffer outside guest memory is an error, not a silent short answer.
                GuestBuffers::new(mem, &req.data).map_err(|e| Self::ioerr("get id", e))?;
                Ok(write_to_segments(mem, &req.data, &id) as u32)
            }
            Kind::Discard(ranges) => {
                if ro {
                    return Err(virtio_blk::VIRTIO_BLK_S_IOERR);
                }
                self.trim(ranges, false)
            }
            Kind::WriteZeroes(ranges) => {
                if ro {
                    return Err(virtio_blk::VIRTIO_BLK_S_IOERR);
                }
                self.trim(ranges, true)
            }
            Kind::Unsupported(t) => {
                debug!("unsupported request type {t}");
                Err(virtio_blk::VIRTIO_BLK_S_UNSUPP)
            }
        }
    }

    fn trim(&self, ranges: &[Range], zero: bool) -> Result<u32, u8> {
        // Check every range before changing anything.
        let mut checked = Vec::with_capacity(ranges.len());
        for r in ranges {
            let allowed = if zero {
                virtio_blk::WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if r.flags & !allowed != 0 {
                return Err(virtio_blk::VIRTIO_BLK_S_UNSUPP);
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

/// The device as vhost-user-backend sees it: one worker thread per queue.
#[derive(Clone)]
pub struct BlockBackend(pub Arc<BlockDevice>);

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.0.options.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.0.options.queue_size
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | (1 << VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.0.options.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.0.config_bytes();
        let start = (offset as usize).min(bytes.len());
        let end = start.saturating_add(size as usize).min(bytes.len());
        let mut out = bytes[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback flag is writable (VIRTIO_BLK_F_CONFIG_WCE).
        let wce_offset = std::mem::offset_of!(BlockConfig, wce) as u32;
        if offset == wce_offset && buf.len() == 1 {
            let writeback = buf[0] != 0;
            self.0.writethrough.store(!writeback, Ordering::Relaxed);
            self.0.config.write().unwrap_or_else(|e| e.into_inner()).wce = u8::from(writeback);
            if !writeback {
                self.0.chain.flush().map_err(io::Error::from)?;
            }
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "only the writeback flag of the config space is writable",
        ))
    }

    fn update_memory(&self, mem: GuestMemoryType) -> io::Result<()> {
        *self.0.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.0.options.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let vring = vrings
            .get(device_event as usize)
            .ok_or_else(|| io::Error::other(format!("no queue {device_event}")))?;
        self.0.process_queue(vring)
    }
}
