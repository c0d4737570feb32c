//! The vhost-user-blk device: features, config space, and the queue processing that turns
//! descriptor chains into operations on the VHDX chain.
//!
//! Queue processing (pop, parse, execute, complete) lives in [`BlockDevice::process_queue`]; the
//! rings, their state and the in-flight record are [`crate::queue`]'s, the vhost-user messages
//! [`crate::handler`]'s.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryMmap;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{Immutable, IntoBytes, KnownLayout};

use crate::async_requests::AsyncQueue;
use crate::held::Held;
use crate::helper_pool::HelperPool;
use crate::queue::{Popped, Queue, QueueServer};
use crate::requests::{Requests, MAX_DISCARD_SECTORS};
use crate::vhdx::write::defer_metadata_waits;
use crate::vhdx::Chain;
use crate::virtio_blk::{self, Descriptor};

/// Queues offered: QEMU defaults `num-queues` to the vCPU count, so offer plenty.
pub const DEFAULT_NUM_QUEUES: u16 = 16;
/// Cloud Hypervisor's `queue_size=1024` and QEMU's largest (1024) must be accepted.
pub const DEFAULT_QUEUE_SIZE: usize = 1024;
/// Advertised, not trusted: requests with more segments are served anyway.
const SEG_MAX: u32 = 128;
/// Completions after which a waiting driver is signalled mid-batch (see `process_queue`).
const EARLY_SIGNAL_AFTER: usize = 8;
/// A read this large is worth sharing with the helper threads (see `process_queue`). Only
/// reads: buffered writes to one file take the kernel's inode lock (ext4's i_rwsem) one at a
/// time, so a helper would only spin on it (1 MiB writes QD8: 24% of the time in
/// rwsem_spin_on_owner and 10% less throughput with a helper than without).
const LARGE_READ: u64 = 128 << 10;

/// Operations one queue's asynchronous I/O runs at once (io_uring entries, worker threads up
/// to the pool's own limit); a guest that queues more has them wait in the queue's pending list.
pub const ASYNC_DEPTH: usize = 256;

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
    /// `--aio`: requests in flight through this I/O layer ([`crate::async_requests`]); None
    /// (`--aio off`): each queue thread runs its requests one at a time.
    pub aio: Option<crate::io::AioChoice>,
    /// Threads that help a queue with a batch of large requests (0: none).
    pub helper_threads: usize,
    /// `--poll-us`: how long a queue thread polls at most before it sleeps ([`crate::poll`]).
    pub poll: std::time::Duration,
}

/// The queue thread's server without `--aio`: [`BlockDevice::process_queue`].
pub struct SyncServer(pub Arc<BlockDevice>);

impl QueueServer for SyncServer {
    fn serve(&mut self, queue: &Arc<Queue>) {
        self.0.process_queue(queue);
    }
}

/// The default number of helper threads: one per core beyond the queue thread's own.
pub fn default_helper_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() - 1)
        .unwrap_or(0)
}

pub struct BlockDevice {
    /// What runs a request; shared with the helper threads.
    requests: Arc<Requests>,
    options: DeviceOptions,
    config: RwLock<BlockConfig>,
    helpers: HelperPool,
}

impl BlockDevice {
    pub fn new(chain: Arc<Chain>, options: DeviceOptions) -> io::Result<BlockDevice> {
        let lss = chain.logical_sector_size();
        let leaf = chain.leaf();
        // The guest never learns that this process was killed and restarted, so what it saw
        // complete must survive that: a request that changed metadata (a first write to a
        // block, a discard) completes only once the change is in the log on the file, which
        // the next open replays. Data itself is in the page cache already.
        leaf.wait_for_metadata(true);
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
        Ok(BlockDevice {
            requests: Arc::new(Requests {
                chain,
                read_only: options.read_only,
                serial: options.serial.clone(),
                writethrough: AtomicBool::new(options.writethrough),
            }),
            // With requests in flight the disk overlaps them already; the helpers only help
            // the one-at-a-time path.
            helpers: HelperPool::new(if options.aio.is_some() {
                0
            } else {
                options.helper_threads
            })?,
            options,
            config: RwLock::new(config),
        })
    }

    pub fn chain(&self) -> &Arc<Chain> {
        &self.requests.chain
    }

    pub fn options(&self) -> &DeviceOptions {
        &self.options
    }

    pub fn num_queues(&self) -> usize {
        self.options.num_queues
    }

    pub fn max_queue_size(&self) -> usize {
        self.options.queue_size
    }

    /// The virtio features offered.
    pub fn features(&self) -> u64 {
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
        if self.options.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    /// The vhost-user protocol features offered.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    /// The driver's features are known (SET_FEATURES): a driver that negotiated neither FLUSH
    /// nor CONFIG_WCE cannot ask for a flush, so it gets a write-through cache (virtio 1.2
    /// §5.2.5.1; Linux and QEMU treat such a device so), unless `--writethrough` already holds.
    pub fn set_driver_features(&self, features: u64) {
        let can_flush =
            features & ((1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_CONFIG_WCE)) != 0;
        let wce = self.config.read().unwrap_or_else(|e| e.into_inner()).wce != 0;
        self.requests
            .writethrough
            .store(!can_flush || !wce, Ordering::Relaxed);
    }

    /// Bytes `[offset, offset + size)` of the config space; zeros past its end.
    pub fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.config_bytes();
        let start = (offset as usize).min(bytes.len());
        let end = start.saturating_add(size as usize).min(bytes.len());
        let mut out = bytes[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    /// Writes the config space: only the writeback flag is writable (CONFIG_WCE).
    pub fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let wce_offset = std::mem::offset_of!(BlockConfig, wce) as u32;
        if offset == wce_offset && buf.len() == 1 {
            let writeback = buf[0] != 0;
            self.requests
                .writethrough
                .store(!writeback, Ordering::Relaxed);
            self.config.write().unwrap_or_else(|e| e.into_inner()).wce = u8::from(writeback);
            if !writeback {
                self.requests.chain.flush().map_err(io::Error::from)?;
            }
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "only the writeback flag of the config space is writable",
        ))
    }

    pub fn config_bytes(&self) -> Vec<u8> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_bytes()
            .to_vec()
    }

    /// Pops, executes and completes every available request of `queue`.
    ///
    /// Requests run one after another on the calling (queue) thread until a large read turns
    /// up; then everything available is taken as one batch and shared with the helper threads
    /// (see [`crate::helper_pool`]). Either way every popped request is complete on return.
    /// Whatever is popped goes through the queue's in-flight record ([`Queue::pop`] /
    /// [`Queue::complete`]), which is what stopping the queue waits on.
    ///
    /// A request whose metadata change is not durable yet (see [`BlockDevice::new`]) is held
    /// back while the thread runs the ones behind it, and completed once the change is in the
    /// log, before this returns: so a batch of first writes shares one or two commits instead
    /// of waiting for one each. The other requests complete as soon as they are done.
    ///
    /// Guest notifications are left disabled: the queue thread enables them before it sleeps
    /// (see [`QueueServer`]).
    pub fn process_queue(&self, queue: &Arc<Queue>) {
        let mut held = Held::default();
        {
            queue.disable_notification();
            let mut completed = 0;
            while let Some(p) = queue.pop() {
                if !self.helpers.is_empty() && read_bytes(&p.descs) >= LARGE_READ {
                    self.complete_held(queue, &mut held);
                    self.run_batch(queue, p);
                    completed = 0;
                    continue;
                }
                let (outcome, generation) = defer_metadata_waits(|| self.requests.run_popped(&p));
                if generation > 0 {
                    held.hold(p, outcome, generation);
                    continue;
                }
                if held.passed_one() {
                    self.complete_held(queue, &mut held);
                }
                if queue.complete(p.head, outcome, false) {
                    completed += 1;
                }
                // Tell a waiting driver now rather than after the whole batch: it refills
                // the ring while this thread works on the rest, so the two run in parallel
                // instead of taking turns (1 queue, 4 KiB QD32: 300k -> 450k IOPS). With
                // EVENT_IDX the driver asks only when it is about to sleep; a few
                // completions are gathered first so that a machine with more busy threads
                // than cores does not spend its time waking the driver for each one.
                if completed >= EARLY_SIGNAL_AFTER && queue.signal_if_needed() {
                    completed = 0;
                }
            }
            self.complete_held(queue, &mut held);
            if completed > 0 {
                queue.signal_if_needed();
            }
        }
    }

    /// Completes the held requests once their metadata is in the log ([`Held::complete`]).
    fn complete_held(&self, queue: &Queue, held: &mut Held) {
        if held.complete(&self.requests, queue) > 0 {
            queue.signal_if_needed();
        }
    }

    /// Runs `first` and every request available after it as one batch, on this thread and
    /// the helpers; each request is completed (and the driver signalled if it waits) as soon
    /// as it is done, in whatever order they finish: virtio lets a device complete requests
    /// out of order, and a driver orders dependent requests itself (a guest issues a flush
    /// only after the writes it covers have completed).
    ///
    /// When this thread finds nothing left to take, it takes what the driver has added since
    /// as the next batch at once, rather than wait for the helpers' last requests first: the
    /// driver refills the ring as requests complete, and a core idle at each batch's end cost
    /// about a tenth of the throughput. At most two batches are live; all are done on return.
    fn run_batch(&self, queue: &Arc<Queue>, first: Popped) {
        let requests = Arc::clone(&self.requests);
        let queue_ref = Arc::clone(queue);
        let run = move |p: Popped| {
            let outcome = requests.run_popped(&p);
            queue_ref.complete(p.head, outcome, true);
        };
        let mut batch = VecDeque::from([first]);
        let mut previous = None;
        loop {
            batch.extend(std::iter::from_fn(|| queue.pop()));
            let running = self.helpers.start(batch, run.clone());
            running.work();
            if let Some(previous) = previous.replace(running) {
                previous.wait();
            }
            batch = VecDeque::new();
            match queue.pop() {
                Some(p) => batch.push_back(p),
                None => break,
            }
        }
        if let Some(last) = previous {
            last.wait();
        }
    }

    /// With `--aio`: the asynchronous state of one queue thread ([`AsyncQueue`]), for a queue
    /// of at most `max_size` heads, its I/O [`ASYNC_DEPTH`] operations deep (more wait in its
    /// pending list). `None`: the synchronous path ([`Self::process_queue`]).
    pub fn async_queue(&self, max_size: u16) -> Option<io::Result<AsyncQueue>> {
        let choice = self.options.aio?;
        let depth = usize::from(max_size).clamp(1, ASYNC_DEPTH);
        let io = match crate::io::new_io(choice, depth) {
            // The probe at startup passed, yet this ring could not be set up (memory, a
            // limit): the thread pool serves this queue rather than no one.
            Err(e) if choice == crate::io::AioChoice::IoUring => {
                log::warn!("an io_uring of {depth} entries: {e}; this queue uses a thread pool");
                crate::io::new_io(crate::io::AioChoice::Threads, depth)
            }
            other => other,
        };
        Some(io.map(|io| AsyncQueue::new(Arc::clone(&self.requests), io, max_size)))
    }

    /// Runs one request; returns the used length (bytes written to the guest).
    pub fn execute(&self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> u32 {
        self.requests.execute(mem, descs)
    }
}

/// Bytes of a request's device-writable descriptors: a read's data (and its status byte).
fn read_bytes(descs: &[Descriptor]) -> u64 {
    descs
        .iter()
        .filter(|d| d.writable)
        .map(|d| u64::from(d.len))
        .sum()
}
