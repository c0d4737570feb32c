//! The vhost-user messages of one connection, on the `vhost` crate's message layer
//! (`BackendReqHandler` parses and answers; [`BlkHandler`] decides).
//!
//! Why not vhost-user-backend (0.24): its handler is private, so nothing can be checked before
//! it acts; it answers GET_VRING_BASE while the queue's requests still run (no drain unless the
//! device implements `stop_vring`, and its worker threads cannot see the in-flight requests of
//! the helpers); it refuses GET/SET_INFLIGHT_FD and has no hook at ring start to resubmit; and
//! it leaks an eventfd per queue per connection. Here every value of a message is checked where
//! it enters, a refusal is an error reply (never an ack followed by something else), and the
//! queues ([`crate::queue`]) are owned by this connection: their threads start with it and are
//! joined when it ends, so a connection leaves nothing behind.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, info, warn};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, GpuBackend};
use vhost::vhost_user::{
    Error as VhostError, Result as VhostResult, VhostUserBackendReqHandlerMut,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, VolatileSlice};

use crate::backend::{BlockDevice, SyncServer};
use crate::guest_memory;
use crate::inflight::{queue_region_size, region_size, QueueRegion};
use crate::poll::AdaptivePoll;
use crate::queue::{run_queue_thread, Queue, ResumeError};

/// SET_MEM_TABLE carries at most this many regions (vhost-user: VHOST_MEMORY_BASELINE_NREGIONS).
const MAX_TABLE_REGIONS: usize = 8;
/// Memory slots advertised with CONFIGURE_MEM_SLOTS (GET_MAX_MEM_SLOTS), and the most regions
/// accepted in all. QEMU refuses to hot-plug memory (DIMMs, virtio-mem memslots) beyond what
/// every vhost-user backend of the VM can map; 509 is what libvhost-user and the kernel's
/// KVM-derived default give, so this backend never is the one that limits a VM. A region costs
/// a mapping and its fd, bounded by this number.
const MAX_MEM_SLOTS: usize = 509;

/// A mapped guest memory region and the VMM address it was known by.
struct Region {
    guest: Arc<GuestRegionMmap>,
    user_addr: u64,
    size: u64,
}

pub struct BlkHandler {
    device: Arc<BlockDevice>,
    queues: Vec<Arc<Queue>>,
    workers: Vec<JoinHandle<()>>,
    acked_features: u64,
    acked_protocol: u64,
    regions: Vec<Region>,
    /// Why the last message was refused (an error reply was sent if the VMM asked for one).
    refused: Option<String>,
}

fn refuse(why: impl Into<String>) -> VhostError {
    VhostError::ReqHandlerError(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        why.into(),
    ))
}

impl BlkHandler {
    /// A handler for one connection, with a thread per queue.
    pub fn new(device: Arc<BlockDevice>) -> std::io::Result<BlkHandler> {
        let max = device.max_queue_size() as u16;
        let mut handler = BlkHandler {
            queues: Vec::new(),
            workers: Vec::new(),
            acked_features: 0,
            acked_protocol: 0,
            regions: Vec::new(),
            refused: None,
            device,
        };
        for i in 0..handler.device.num_queues() {
            let q = Arc::new(Queue::new(i, max)?);
            let (dev, queue) = (Arc::clone(&handler.device), Arc::clone(&q));
            let t = std::thread::Builder::new()
                .name(format!("queue-{i}"))
                .spawn(move || {
                    crate::guest_memory::block_async_signals();
                    crate::sandbox::ThreadKind::Queue.confine();
                    let mut poll = AdaptivePoll::new(dev.options().poll);
                    let r = match dev.async_queue(max) {
                        None => {
                            let mut server = SyncServer(Arc::clone(&dev));
                            run_queue_thread(&queue, None, &mut poll, &mut server)
                        }
                        Some(Ok(mut aq)) => {
                            let notifier = aq.notifier();
                            let r = run_queue_thread(&queue, Some(notifier), &mut poll, &mut aq);
                            // Nothing in flight outlives the thread.
                            aq.finish_all(&queue);
                            r
                        }
                        Some(Err(e)) => Err(e),
                    };
                    if let Err(e) = r {
                        warn!("queue {i}: its thread ended: {e}");
                    }
                })?;
            handler.queues.push(q);
            handler.workers.push(t);
        }
        Ok(handler)
    }

    /// The reason of the last refusal, if the last message was refused.
    pub fn take_refusal(&mut self) -> Option<String> {
        self.refused.take()
    }

    /// Refuses the message: logged here, before the VMM gets the error reply.
    fn refused<T>(&mut self, why: String) -> VhostResult<T> {
        warn!("refused: {why}");
        self.refused = Some(why.clone());
        Err(refuse(why))
    }

    /// Refuses a message the VMM waits for an answer to (GET_*): the vhost crate sends no reply
    /// for an error there, so the connection must end rather than leave the VMM waiting.
    fn refused_no_reply<T>(&mut self, why: String) -> VhostResult<T> {
        warn!("refused (the connection ends): {why}");
        Err(refuse(why))
    }

    fn queue(&mut self, index: u32) -> VhostResult<Arc<Queue>> {
        match self.queues.get(index as usize) {
            Some(q) => Ok(Arc::clone(q)),
            None => self.refused(format!("no queue {index}")),
        }
    }

    /// Publishes the memory map to every queue and wakes those that may run.
    fn publish_memory(&mut self) -> VhostResult<()> {
        let mut regions: Vec<_> = self.regions.iter().map(|r| Arc::clone(&r.guest)).collect();
        regions.sort_by_key(|r| vm_memory::GuestMemoryRegion::start_addr(&**r));
        guest_memory::track(&regions);
        let mem = if regions.is_empty() {
            Arc::new(GuestMemoryMmap::new())
        } else {
            match GuestMemoryMmap::from_arc_regions(regions) {
                Ok(m) => Arc::new(m),
                Err(e) => return self.refused(format!("memory regions: {e}")),
            }
        };
        for q in &self.queues {
            q.lock().set_mem(Arc::clone(&mem));
            q.wake();
        }
        Ok(())
    }

    /// Maps one region after checking it against its fd.
    fn map_region(&mut self, r: &VhostUserMemoryRegion, file: File) -> VhostResult<Region> {
        let size = match nix::sys::stat::fstat(file.as_fd()) {
            Ok(st) => st.st_size as u64,
            Err(e) => return self.refused(format!("memory region fd: {e}")),
        };
        let (gpa, len, offset) = (r.guest_phys_addr, r.memory_size, r.mmap_offset);
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > size) {
            return self.refused(format!(
                "memory region at {gpa:#x}: {len:#x} bytes at offset {offset:#x} of an fd of {size:#x} bytes"
            ));
        }
        let Ok(len) = usize::try_from(len) else {
            return self.refused("memory region too large".into());
        };
        let mmap = match MmapRegion::<()>::from_file(FileOffset::new(file, offset), len) {
            Ok(m) => m,
            Err(e) => return self.refused(format!("mapping a memory region: {e}")),
        };
        let Some(guest) = GuestRegionMmap::new(mmap, GuestAddress(gpa)) else {
            return self.refused(format!("memory region at {gpa:#x} wraps the address space"));
        };
        Ok(Region {
            guest: Arc::new(guest),
            user_addr: r.user_addr,
            size: len as u64,
        })
    }

    /// A VMM virtual address to a guest physical address.
    fn vmm_to_guest(&self, va: u64, len: u64) -> Option<GuestAddress> {
        self.regions.iter().find_map(|r| {
            let off = va.checked_sub(r.user_addr)?;
            (off.checked_add(len)? <= r.size)
                .then(|| GuestAddress(vm_memory::GuestMemoryRegion::start_addr(&*r.guest).0 + off))
        })
    }

    /// The ring of `q` starts: recover what the in-flight region says was left unfinished.
    fn start_ring(&mut self, q: &Queue) {
        let mut st = q.lock();
        if !self.protocol_features_acked() {
            st.set_enabled(true);
        }
        if !st.inflight.has_region() || !st.addresses_set {
            return;
        }
        let Some(mem) = st.mem().cloned() else {
            return;
        };
        match st.resume(&mem) {
            Ok(None) => {}
            Ok(Some(heads)) => {
                if !heads.is_empty() {
                    info!(
                        "queue {}: resubmitting {} requests left in flight",
                        q.index,
                        heads.len()
                    );
                }
            }
            Err(ResumeError::Ring(e)) => warn!("queue {}: {e}", q.index),
            Err(ResumeError::Region(e)) => {
                warn!(
                    "queue {}: in-flight region refused, not tracking: {e}",
                    q.index
                );
            }
        }
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Stops every queue and joins its thread.
    fn shutdown(&mut self) {
        for q in &self.queues {
            q.request_exit();
        }
        for t in self.workers.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for BlkHandler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl VhostUserBackendReqHandlerMut for BlkHandler {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        for q in &self.queues {
            q.stop(false);
        }
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        self.refused("RESET_DEVICE is not offered".into())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(self.device.features())
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        let unknown = features & !self.device.features();
        if unknown != 0 {
            return self.refused(format!("features {unknown:#x} were not offered"));
        }
        self.acked_features = features;
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &self.queues {
            q.lock().ring.event_idx = event_idx;
        }
        self.device.set_driver_features(features);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<Vec<u64>>> {
        if ctx.len() > MAX_TABLE_REGIONS {
            return self.refused(format!(
                "SET_MEM_TABLE with {} regions (at most {MAX_TABLE_REGIONS})",
                ctx.len()
            ));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        for (r, f) in ctx.iter().zip(files) {
            regions.push(self.map_region(r, f)?);
        }
        let old = std::mem::replace(&mut self.regions, regions);
        if let Err(e) = self.publish_memory() {
            self.regions = old;
            return Err(e);
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let q = self.queue(index)?;
        let max = u32::from(q.lock().max_size());
        if num == 0 || num > max || !num.is_power_of_two() {
            return self.refused(format!(
                "queue {index}: size {num} (a power of two up to {max})"
            ));
        }
        let mut st = q.quiesce();
        st.ring.size = num as u16;
        st.inflight.reset(num as u16);
        st.reinit();
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        let q = self.queue(index)?;
        let size = u64::from(q.lock().ring.size);
        let (Some(desc), Some(avail), Some(used_gpa)) = (
            self.vmm_to_guest(descriptor, 16 * size),
            self.vmm_to_guest(available, 6 + 2 * size),
            self.vmm_to_guest(used, 6 + 8 * size),
        ) else {
            return self.refused(format!(
                "queue {index}: ring addresses {descriptor:#x}/{available:#x}/{used:#x} are not in guest memory"
            ));
        };
        let mut st = q.quiesce();
        st.ring.desc = desc;
        st.ring.avail = avail;
        st.ring.used = used_gpa;
        st.reinit();
        // The used index continues from what the ring holds (a driver reset sets it to 0).
        let next_used = st
            .mem()
            .map(|m| st.ring.check(m).and_then(|()| st.ring.used_idx(m)));
        match next_used {
            Some(Ok(u)) => st.ring.set_next_used(u),
            Some(Err(e)) => {
                drop(st);
                return self.refused(format!("queue {index}: {e}"));
            }
            None => {}
        }
        st.addresses_set = true;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let q = self.queue(index)?;
        let Ok(base) = u16::try_from(base) else {
            return self.refused(format!("queue {index}: base {base} is not a ring index"));
        };
        let mut st = q.quiesce();
        st.ring.set_next_avail(base);
        st.reinit();
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let Some(q) = self.queues.get(index as usize).cloned() else {
            return self.refused_no_reply(format!("GET_VRING_BASE of queue {index}"));
        };
        let next = q.stop(false);
        debug!("queue {index} stopped at {next}");
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let q = self.queue(u32::from(index))?;
        q.lock().set_kick(fd);
        self.start_ring(&q);
        // Serve what is already there: kicks sent before the ring could run are gone.
        q.wake();
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let q = self.queue(u32::from(index))?;
        let mut st = q.lock();
        st.set_call(fd);
        // One interrupt now (as libvhost-user): a driver that waited for a completion that was
        // signalled on the previous call fd looks at its used ring again.
        st.signal();
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostResult<()> {
        self.queue(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(self.device.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        let offered = self.device.protocol_features().bits();
        if features & !offered != 0 {
            return self.refused(format!(
                "protocol features {:#x} were not offered",
                features & !offered
            ));
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(self.queues.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        let q = self.queue(index)?;
        if enable {
            q.lock().set_enabled(true);
            q.wake();
        } else {
            q.stop(true);
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        Ok(self.device.get_config(offset, size))
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<()> {
        match self.device.set_config(offset, buf) {
            Ok(()) => Ok(()),
            Err(e) => self.refused(format!("SET_CONFIG: {e}")),
        }
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VhostResult<()> {
        self.refused("not a GPU".into())
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        self.refused_no_reply("no shared objects".into())
    }

    fn get_inflight_fd(
        &mut self,
        msg: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        let (nq, qs) = (msg.num_queues, msg.queue_size);
        if nq == 0
            || usize::from(nq) > self.queues.len()
            || !qs.is_power_of_two()
            || usize::from(qs) > self.device.max_queue_size()
        {
            return self
                .refused_no_reply(format!("GET_INFLIGHT_FD for {nq} queues of {qs} entries"));
        }
        let size = region_size(nq, qs);
        let fd = memfd_create(
            "vhost-inflight",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(|e| refuse(format!("memfd_create: {e}")))?;
        let file = File::from(fd);
        // A new memfd reads as zeros: every queue's part starts at version 0 (fresh).
        file.set_len(size as u64)
            .map_err(|e| refuse(format!("sizing the in-flight region: {e}")))?;
        fcntl(
            &file,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL,
            ),
        )
        .map_err(|e| refuse(format!("sealing the in-flight region: {e}")))?;
        Ok((
            VhostUserInflight {
                mmap_size: size as u64,
                mmap_offset: 0,
                num_queues: nq,
                queue_size: qs,
            },
            file,
        ))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VhostResult<()> {
        let (nq, qs) = (msg.num_queues, msg.queue_size);
        if nq == 0
            || usize::from(nq) > self.queues.len()
            || !qs.is_power_of_two()
            || usize::from(qs) > self.device.max_queue_size()
        {
            return self.refused(format!("SET_INFLIGHT_FD for {nq} queues of {qs} entries"));
        }
        let size = region_size(nq, qs);
        if msg.mmap_size != size as u64 {
            return self.refused(format!(
                "SET_INFLIGHT_FD of {} bytes; {nq} queues of {qs} entries take {size}",
                msg.mmap_size
            ));
        }
        let fd_size = match nix::sys::stat::fstat(file.as_fd()) {
            Ok(st) => st.st_size as u64,
            Err(e) => return self.refused(format!("in-flight fd: {e}")),
        };
        if msg
            .mmap_offset
            .checked_add(msg.mmap_size)
            .is_none_or(|end| end > fd_size)
        {
            return self.refused(format!(
                "in-flight region {:#x}+{:#x} is past its fd's end ({fd_size:#x})",
                msg.mmap_offset, msg.mmap_size
            ));
        }
        let map = match MmapRegion::<()>::from_file(FileOffset::new(file, msg.mmap_offset), size) {
            Ok(m) => Arc::new(m),
            Err(e) => return self.refused(format!("mapping the in-flight region: {e}")),
        };
        guest_memory::track_mapping(map.as_ptr() as usize, size, map.clone());
        let part = queue_region_size(qs);
        let mut parts = Vec::new();
        for i in 0..usize::from(nq) {
            // SAFETY: `[i * part, (i + 1) * part)` lies in the mapping (size = nq * part), which
            // the QueueRegion keeps alive through `map`; the memory is shared with the VMM, which
            // is what volatile access is for.
            let slice = unsafe { VolatileSlice::new(map.as_ptr().add(i * part), part) };
            // Check each part before anything is trusted.
            let version = vm_memory::Bytes::read_obj::<u16>(&slice, 8).unwrap_or(0);
            let desc_num = vm_memory::Bytes::read_obj::<u16>(&slice, 10).unwrap_or(0);
            if version > 1 || (version == 1 && desc_num != qs) {
                return self.refused(format!(
                    "in-flight region of queue {i}: version {version}, {desc_num} entries (expected 0 or 1, {qs})"
                ));
            }
            parts.push(QueueRegion::new(slice, map.clone() as Arc<dyn Send + Sync>));
        }
        let mut parts = parts.into_iter();
        for q in &self.queues {
            // Queues past the region's count are not tracked (no stale region from before).
            let part = parts.next();
            let mut st = q.lock();
            if !st.inflight.is_empty() {
                warn!(
                    "queue {}: SET_INFLIGHT_FD while requests run: ignored for it",
                    q.index
                );
                continue;
            }
            st.inflight.set_region(part);
        }
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<u64>> {
        if self.regions.len() >= MAX_MEM_SLOTS {
            return self.refused(format!(
                "ADD_MEM_REG beyond the {MAX_MEM_SLOTS} memory slots advertised"
            ));
        }
        let r = self.map_region(region, fd)?;
        self.regions.push(r);
        if let Err(e) = self.publish_memory() {
            self.regions.pop();
            return Err(e);
        }
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        let before = self.regions.len();
        let gpa = region.guest_phys_addr;
        let size = region.memory_size;
        self.regions.retain(|r| {
            vm_memory::GuestMemoryRegion::start_addr(&*r.guest).0 != gpa || r.size != size
        });
        if self.regions.len() == before {
            return self.refused(format!("REM_MEM_REG of an unknown region at {gpa:#x}"));
        }
        // Requests in flight keep their snapshot of the map, so the region stays mapped until
        // they are done.
        self.publish_memory()
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        self.refused("device state transfer is not offered".into())
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        self.refused("device state transfer is not offered".into())
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        self.refused_no_reply("no shared memory regions".into())
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostResult<()> {
        self.refused_no_reply("dirty logging is not offered".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::DeviceOptions;
    use crate::vhdx::create::{create, CreateOptions};
    use crate::vhdx::{Chain, ChainOptions};
    use nix::fcntl::FcntlArg;

    fn handler(dir: &tempfile::TempDir) -> BlkHandler {
        let path = dir.path().join("d.vhdx");
        create(
            &path,
            &CreateOptions {
                virtual_size: Some(16 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let chain = Chain::open(
            &path,
            &ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        let dev = BlockDevice::new(
            Arc::new(chain),
            DeviceOptions {
                read_only: false,
                num_queues: 2,
                queue_size: 1024,
                serial: "s".into(),
                writethrough: false,
                helper_threads: 0,
                aio: None,
                poll: std::time::Duration::ZERO,
            },
        )
        .unwrap();
        BlkHandler::new(Arc::new(dev)).unwrap()
    }

    fn memfd(len: u64) -> File {
        let f = File::from(memfd_create("test", MFdFlags::MFD_CLOEXEC).unwrap());
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn ring_values_that_cannot_be_right_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = handler(&dir);
        for bad in [0, 100, 2048, 65536] {
            assert!(h.set_vring_num(0, bad).is_err(), "size {bad}");
            assert!(h.take_refusal().is_some());
        }
        assert!(h.set_vring_num(0, 1024).is_ok());
        assert!(h.set_vring_num(2, 256).is_err(), "no queue 2");
        assert!(h.set_vring_base(0, 70000).is_err());
        assert!(h.set_vring_base(0, 65535).is_ok());
        // No memory yet: no address can be right.
        let flags = VhostUserVringAddrFlags::empty();
        assert!(h
            .set_vring_addr(0, flags, 0x1000, 0x3000, 0x2000, 0)
            .is_err());
        assert!(h.take_refusal().is_some());
        assert!(h.get_vring_base(7).is_err());
        assert!(
            h.take_refusal().is_none(),
            "GET_VRING_BASE refusals end the connection"
        );
    }

    #[test]
    fn memory_tables_are_checked_against_their_fds() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = handler(&dir);
        let mib = 1u64 << 20;
        // Longer than its fd, or past its end through the offset.
        let long = VhostUserMemoryRegion::new(0, 2 * mib, 0x7000_0000, 0);
        assert!(h.set_mem_table(&[long], vec![memfd(mib)], None).is_err());
        let off = VhostUserMemoryRegion::new(0, mib, 0x7000_0000, 4096);
        assert!(h.set_mem_table(&[off], vec![memfd(mib)], None).is_err());
        // Nine regions.
        let nine: Vec<_> = (0..9)
            .map(|i| VhostUserMemoryRegion::new(i * mib, mib, 0x7000_0000 + i * mib, 0))
            .collect();
        let files = (0..9).map(|_| memfd(mib)).collect();
        assert!(h.set_mem_table(&nine, files, None).is_err());
        // One that fits, then a ring in it (VMM addresses translated).
        let ok = VhostUserMemoryRegion::new(0, mib, 0x7000_0000, 0);
        assert!(h.set_mem_table(&[ok], vec![memfd(mib)], None).is_ok());
        h.set_vring_num(0, 256).unwrap();
        let flags = VhostUserVringAddrFlags::empty;
        h.set_vring_addr(0, flags(), 0x7000_0000, 0x7000_3000, 0x7000_2000, 0)
            .unwrap();
        assert_eq!(h.queues[0].lock().ring.used, GuestAddress(0x3000));
        // A used ring running past the region.
        assert!(h
            .set_vring_addr(0, flags(), 0x7000_0000, 0x700f_fff0, 0x7000_2000, 0)
            .is_err());
    }

    #[test]
    fn inflight_regions_are_made_sealed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = handler(&dir);
        let ask = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 256,
        };
        let (got, file) = h.get_inflight_fd(&ask).unwrap();
        assert_eq!(got.mmap_size, region_size(2, 256) as u64);
        assert_eq!(file.metadata().unwrap().len(), got.mmap_size);
        let seals = fcntl(&file, FcntlArg::F_GET_SEALS).unwrap();
        let want = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        assert_eq!(SealFlag::from_bits_truncate(seals) & want, want);
        assert!(h.set_inflight_fd(&got, file.try_clone().unwrap()).is_ok());
        for bad in [
            VhostUserInflight {
                mmap_size: 4096,
                ..got
            },
            VhostUserInflight {
                queue_size: 100,
                ..got
            },
            VhostUserInflight {
                num_queues: 3,
                ..got
            },
            VhostUserInflight {
                mmap_offset: 4096,
                ..got
            },
        ] {
            assert!(h.set_inflight_fd(&bad, file.try_clone().unwrap()).is_err());
        }
        assert!(h
            .get_inflight_fd(&VhostUserInflight {
                num_queues: 9,
                ..ask
            })
            .is_err());
    }
}
