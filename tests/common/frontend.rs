//! A raw vhost-user front-end for tests: it speaks the protocol byte by byte over a unix socket
//! (file descriptors travel with SCM_RIGHTS), lays out its own split virtqueues and data buffers
//! in a memfd that it shares with SET_MEM_TABLE, and submits virtio-blk requests as a guest
//! driver would.
//!
//! It is written for misbehaving on purpose as much as for behaving: every message can be sent
//! with any payload ([`Frontend::send`]), every ring field can be written by hand through
//! [`Memory`], and nothing here checks what the tests ask for. The well-behaved path is
//! [`Frontend::start`] (negotiation, memory table, queues) followed by [`Frontend::read`] /
//! [`Frontend::write`] or [`Frontend::submit`] + [`Frontend::wait`].
//!
//! Addresses: guest memory is one memfd mapped here at some host address `va`; a region is
//! announced with guest-physical address `gpa`, so guest address `g` is host address
//! `va + g - gpa`. Descriptor addresses are guest-physical; the ring addresses of
//! SET_VRING_ADDR are front-end (host) addresses, as QEMU sends them.
//!
//! The message layouts follow QEMU's docs/interop/vhost-user.rst; nothing here is copied from
//! another implementation.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// ---------------------------------------------------------------------------------------------
// Protocol constants

/// Front-end request ids (vhost-user.rst, "Front-end message types").
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const GET_CONFIG: u32 = 24;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
}

/// Header flags: protocol version 1, "this is a reply", "reply with an ack".
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// SET_VRING_KICK/CALL: no fd attached.
pub const VRING_NOFD: u64 = 0x100;

/// Protocol feature bits.
pub mod proto {
    pub const MQ: u64 = 1 << 0;
    pub const REPLY_ACK: u64 = 1 << 3;
    pub const CONFIG: u64 = 1 << 9;
    pub const INFLIGHT_SHMFD: u64 = 1 << 12;
    pub const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
}

/// Virtio feature bits the tests care about.
pub mod feat {
    pub const BLK_FLUSH: u64 = 1 << 9;
    pub const BLK_CONFIG_WCE: u64 = 1 << 11;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    pub const VERSION_1: u64 = 1 << 32;
}

/// virtio-blk request types and status bytes.
pub mod blk {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
    pub const S_OK: u8 = 0;
    pub const S_IOERR: u8 = 1;
    pub const S_UNSUPP: u8 = 2;
}

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;

/// How long a reply or a completion may take before the test calls the backend hung.
pub const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Guest memory

/// Guest memory: one memfd, mapped shared here, announced at guest-physical address `gpa`.
/// A bump allocator hands out buffers; nothing is ever freed (tests are short).
pub struct Memory {
    pub file: File,
    pub map: GuestMemoryMmap,
    pub gpa: u64,
    pub size: u64,
    next: Mutex<u64>,
}

impl Memory {
    /// `size` bytes of zeroed memory at guest-physical address `gpa`; the allocator starts at
    /// `gpa + 64 KiB` so that the first pages stay free for tests that place things by hand.
    pub fn new(gpa: u64, size: u64) -> Memory {
        let fd = nix::sys::memfd::memfd_create(
            "vhost-test-guest",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .expect("memfd_create");
        let file = File::from(fd);
        file.set_len(size).expect("sizing the guest memfd");
        let map = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(gpa),
            size as usize,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .expect("mapping the guest memfd");
        Memory {
            file,
            map,
            gpa,
            size,
            next: Mutex::new(gpa + 64 * KIB),
        }
    }

    /// The host address of guest address `gpa` (what SET_MEM_TABLE and SET_VRING_ADDR carry).
    pub fn va(&self, gpa: u64) -> u64 {
        self.map.get_host_address(GuestAddress(self.gpa)).unwrap() as u64 + (gpa - self.gpa)
    }

    /// `len` bytes aligned to `align`; panics when memory runs out.
    pub fn alloc(&self, len: u64, align: u64) -> u64 {
        let mut next = self.next.lock().unwrap();
        let at = next.div_ceil(align) * align;
        assert!(
            at + len <= self.gpa + self.size,
            "guest memory exhausted: {len} bytes"
        );
        *next = at + len;
        at
    }

    /// The one region covering all of this memory.
    pub fn region(&self) -> Region {
        Region {
            gpa: self.gpa,
            size: self.size,
            va: self.va(self.gpa),
            offset: 0,
            fd: self.file.as_raw_fd(),
        }
    }

    pub fn put(&self, gpa: u64, bytes: &[u8]) {
        self.map.write_slice(bytes, GuestAddress(gpa)).unwrap();
    }

    pub fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.map.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
        buf
    }

    pub fn put_u16(&self, gpa: u64, v: u16) {
        self.map
            .store(v.to_le(), GuestAddress(gpa), Ordering::SeqCst)
            .unwrap();
    }

    pub fn get_u16(&self, gpa: u64) -> u16 {
        u16::from_le(self.map.load(GuestAddress(gpa), Ordering::SeqCst).unwrap())
    }

    pub fn put_u32(&self, gpa: u64, v: u32) {
        self.map.write_obj(v.to_le(), GuestAddress(gpa)).unwrap();
    }

    pub fn get_u32(&self, gpa: u64) -> u32 {
        u32::from_le(self.map.read_obj(GuestAddress(gpa)).unwrap())
    }

    pub fn put_u64(&self, gpa: u64, v: u64) {
        self.map.write_obj(v.to_le(), GuestAddress(gpa)).unwrap();
    }

    pub fn get_u64(&self, gpa: u64) -> u64 {
        u64::from_le(self.map.read_obj(GuestAddress(gpa)).unwrap())
    }

    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        self.put(gpa, &vec![byte; len]);
    }
}

/// One SET_MEM_TABLE / ADD_MEM_REG entry: guest-physical address, size, front-end address,
/// offset into the fd, and the fd.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub gpa: u64,
    pub size: u64,
    pub va: u64,
    pub offset: u64,
    pub fd: RawFd,
}

impl Region {
    fn bytes(&self) -> [u8; 32] {
        let mut b = [0; 32];
        b[0..8].copy_from_slice(&self.gpa.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.va.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b
    }
}

// ---------------------------------------------------------------------------------------------
// Split virtqueue (driver side)

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    pub gpa: u64,
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

pub fn rd(gpa: u64, len: u32) -> Seg {
    Seg {
        gpa,
        len,
        write: false,
    }
}

pub fn wr(gpa: u64, len: u32) -> Seg {
    Seg {
        gpa,
        len,
        write: true,
    }
}

/// A split virtqueue as the driver sees it: where its three parts are, its eventfds, and the
/// driver's own indices.
pub struct Ring {
    pub index: u32,
    pub size: u16,
    /// Guest-physical addresses of the descriptor table, the avail ring and the used ring.
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: EventFd,
    pub call: EventFd,
    /// The next avail index the driver publishes.
    pub avail_idx: u16,
    /// How far the driver has consumed the used ring.
    pub last_used: u16,
    pub event_idx: bool,
    /// Free descriptor ids, and the descriptor ids of each chain in flight (by head).
    pub free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    /// Per-head request header (16 bytes) and status byte, and a scratch data buffer for
    /// one synchronous request at a time.
    hdrs: u64,
    statuses: u64,
    pub scratch: u64,
    pub scratch_len: u64,
}

/// Where to put a ring (guest-physical addresses), or `None` to allocate it.
#[derive(Clone, Copy, Debug, Default)]
pub struct RingPlace {
    pub desc: Option<u64>,
    pub avail: Option<u64>,
    pub used: Option<u64>,
}

impl Ring {
    /// Lays out a zeroed ring of `size` entries in `mem`.
    pub fn new(mem: &Memory, index: u32, size: u16, place: RingPlace, event_idx: bool) -> Ring {
        let n = size as u64;
        let desc = place.desc.unwrap_or_else(|| mem.alloc(16 * n, 4096));
        let avail = place.avail.unwrap_or_else(|| mem.alloc(6 + 2 * n, 64));
        let used = place.used.unwrap_or_else(|| mem.alloc(6 + 8 * n, 4096));
        mem.fill(desc, 16 * n as usize, 0);
        mem.fill(avail, 6 + 2 * n as usize, 0);
        mem.fill(used, 6 + 8 * n as usize, 0);
        let hdrs = mem.alloc(16 * n, 16);
        let statuses = mem.alloc(n, 1);
        let scratch_len = 256 * KIB;
        let scratch = mem.alloc(scratch_len, 4096);
        Ring {
            index,
            size,
            desc,
            avail,
            used,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            avail_idx: 0,
            last_used: 0,
            event_idx,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            hdrs,
            statuses,
            scratch,
            scratch_len,
        }
    }

    /// The guest address of the request header and the status byte for chain `head`.
    pub fn hdr_of(&self, head: u16) -> u64 {
        self.hdrs + 16 * head as u64
    }

    pub fn status_of(&self, head: u16) -> u64 {
        self.statuses + head as u64
    }

    /// The used ring's index as the device last wrote it.
    pub fn used_idx(&self, mem: &Memory) -> u16 {
        mem.get_u16(self.used + 2)
    }

    /// Element `i` (mod size) of the used ring: (id, len).
    pub fn used_elem(&self, mem: &Memory, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * (i % self.size) as u64;
        (mem.get_u32(at), mem.get_u32(at + 4))
    }

    /// Writes the chain into free descriptors and makes it available (publishes the avail
    /// index); returns its head. Does not kick.
    pub fn add(&mut self, mem: &Memory, segs: &[Seg]) -> u16 {
        assert!(
            segs.len() <= self.free.len(),
            "queue {} has no free descriptors",
            self.index
        );
        let ids: Vec<u16> = (0..segs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, seg) in segs.iter().enumerate() {
            let at = self.desc + 16 * ids[i] as u64;
            let mut flags = if seg.write { DESC_F_WRITE } else { 0 };
            let next = if i + 1 < segs.len() {
                flags |= DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            mem.put_u64(at, seg.gpa);
            mem.put_u32(at + 8, seg.len);
            mem.put_u16(at + 12, flags);
            mem.put_u16(at + 14, next);
        }
        let head = ids[0];
        self.chains.insert(head, ids);
        self.publish(mem, head);
        head
    }

    /// Puts `head` (whatever it is) in the next avail slot and publishes the new avail index.
    pub fn publish(&mut self, mem: &Memory, head: u16) {
        let slot = self.avail + 4 + 2 * (self.avail_idx % self.size) as u64;
        mem.put_u16(slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.put_u16(self.avail + 2, self.avail_idx);
    }

    /// Takes the next used element if the device has written one: (head, len).
    pub fn take_used(&mut self, mem: &Memory) -> Option<(u16, u32)> {
        if self.used_idx(mem) == self.last_used {
            return None;
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        let (id, len) = self.used_elem(mem, self.last_used);
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            // used_event: interrupt me at the next completion.
            mem.put_u16(self.avail + 4 + 2 * self.size as u64, self.last_used);
        }
        let head = u16::try_from(id).unwrap_or_else(|_| panic!("used id {id} is not a u16"));
        let ids = self.chains.remove(&head).unwrap_or_else(|| {
            panic!(
                "queue {}: the device returned head {head}, which is not in flight",
                self.index
            )
        });
        self.free.extend(ids);
        Some((head, len))
    }

    /// Waits (at most `timeout`) for the next used element.
    pub fn wait_used(&mut self, mem: &Memory, timeout: Duration) -> Option<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(u) = self.take_used(mem) {
                return Some(u);
            }
            if Instant::now() > deadline {
                return None;
            }
            // The call eventfd is only a hint here: completions are found in the used ring.
            let _ = self.call.read();
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Chains in flight (made available, not yet used).
    pub fn in_flight(&self) -> usize {
        self.chains.len()
    }
}

// ---------------------------------------------------------------------------------------------
// virtio-blk requests

/// A virtio-blk request; data buffers are placed by the caller ([`Frontend::submit`]) or in the
/// ring's scratch buffer ([`Frontend::request`]).
#[derive(Clone, Debug)]
pub enum Blk {
    Read {
        sector: u64,
        len: u32,
    },
    Write {
        sector: u64,
        data: Vec<u8>,
    },
    Flush,
    GetId,
    Discard {
        sector: u64,
        sectors: u32,
    },
    WriteZeroes {
        sector: u64,
        sectors: u32,
        unmap: bool,
    },
}

/// A submitted request: the queue, the head, where its data and status are.
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    pub queue: usize,
    pub head: u16,
    pub data: u64,
    pub len: u32,
    pub status: u64,
}

// ---------------------------------------------------------------------------------------------
// The connection

/// What a refused message looks like from here: a non-zero ack, a closed connection, or no
/// answer in time.
#[derive(Debug)]
pub enum Refused {
    Nack(u64),
    Closed(String),
}

/// How [`Frontend::start`] sets the device up.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Queues to set up (0..queues).
    pub queues: usize,
    pub queue_size: u16,
    pub event_idx: bool,
    /// Virtio features never acked (on top of EVENT_IDX when `event_idx` is false).
    pub without: u64,
    /// Ask for INFLIGHT_SHMFD and set up an in-flight region (GET + SET_INFLIGHT_FD).
    pub inflight: bool,
    /// Where queue 0's ring goes (others are allocated).
    pub place0: RingPlace,
    /// SET_VRING_BASE for every queue.
    pub base: u16,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            queues: 1,
            queue_size: 256,
            event_idx: true,
            without: 0,
            inflight: false,
            place0: RingPlace::default(),
            base: 0,
        }
    }
}

/// One vhost-user connection to a back-end.
pub struct Frontend {
    pub sock: UnixStream,
    /// What the back-end offered, and what we acked.
    pub offered: u64,
    pub features: u64,
    pub protocol: u64,
    pub queues: Vec<Ring>,
    /// The in-flight region from GET_INFLIGHT_FD: fd, mmap size, and queue size announced.
    pub inflight: Option<Inflight>,
}

/// An in-flight tracking region (vhost-user "Inflight I/O tracking").
pub struct Inflight {
    pub file: File,
    pub size: u64,
    pub offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl Frontend {
    /// Connects to `socket` (retrying for a few seconds while the back-end starts).
    pub fn connect(socket: &Path) -> Frontend {
        let deadline = Instant::now() + TIMEOUT;
        let sock = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    panic!("cannot connect to {}: {e}", socket.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        Frontend {
            sock,
            offered: 0,
            features: 0,
            protocol: 0,
            queues: Vec::new(),
            inflight: None,
        }
    }

    // ---- raw messages ----

    /// Sends one message: header (`request`, flags, payload size) and payload, with `fds`.
    pub fn send(
        &self,
        request: u32,
        flags: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(), Refused> {
        let mut hdr = [0u8; 12];
        hdr[0..4].copy_from_slice(&request.to_le_bytes());
        hdr[4..8].copy_from_slice(&(VERSION | flags).to_le_bytes());
        hdr[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let iov = [IoSlice::new(&hdr), IoSlice::new(payload)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        let n = sendmsg::<()>(
            self.sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| Refused::Closed(format!("sending request {request}: {e}")))?;
        if n != hdr.len() + payload.len() {
            return Err(Refused::Closed(format!("short send of request {request}")));
        }
        Ok(())
    }

    /// Receives one reply to `request`: its payload and the fds that came with it.
    pub fn recv(&self, request: u32) -> Result<(Vec<u8>, Vec<File>), Refused> {
        let mut hdr = [0u8; 12];
        let mut cmsg = nix::cmsg_space!([RawFd; 8]);
        let (got, fds) = {
            let mut iov = [IoSliceMut::new(&mut hdr)];
            let msg = recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(|e| Refused::Closed(format!("no reply to request {request}: {e}")))?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(v) = c {
                    // SAFETY: the kernel just installed these fds for us; nothing else owns them.
                    fds.extend(v.into_iter().map(|fd| unsafe { File::from_raw_fd(fd) }));
                }
            }
            (msg.bytes, fds)
        };
        if got == 0 {
            return Err(Refused::Closed(format!(
                "connection closed instead of a reply to request {request}"
            )));
        }
        if got < hdr.len() {
            (&self.sock)
                .read_exact(&mut hdr[got..])
                .map_err(|e| Refused::Closed(format!("reply header: {e}")))?;
        }
        let id = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
        assert_eq!(id, request, "reply to the wrong request");
        assert!(flags & REPLY != 0, "reply without the reply flag");
        assert!(size <= 4096, "reply of {size} bytes");
        let mut payload = vec![0; size as usize];
        (&self.sock)
            .read_exact(&mut payload)
            .map_err(|e| Refused::Closed(format!("reply payload of request {request}: {e}")))?;
        Ok((payload, fds))
    }

    /// Sends a message that has no reply of its own; with REPLY_ACK negotiated, asks for the
    /// ack and returns `Refused::Nack` if it is not 0.
    pub fn call(&self, request: u32, payload: &[u8], fds: &[RawFd]) -> Result<(), Refused> {
        let ack = self.protocol & proto::REPLY_ACK != 0;
        self.send(request, if ack { NEED_REPLY } else { 0 }, payload, fds)?;
        if ack {
            let (p, _) = self.recv(request)?;
            let v = u64::from_le_bytes(p.get(0..8).unwrap_or(&[0xff; 8]).try_into().unwrap());
            if v != 0 {
                return Err(Refused::Nack(v));
            }
        }
        Ok(())
    }

    /// Sends a request that has a reply (GET_*), returns the reply payload and fds.
    pub fn ask(
        &self,
        request: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(Vec<u8>, Vec<File>), Refused> {
        self.send(request, 0, payload, fds)?;
        self.recv(request)
    }

    fn ask_u64(&self, request: u32) -> Result<u64, Refused> {
        let (p, _) = self.ask(request, &[], &[])?;
        Ok(u64::from_le_bytes(p[0..8].try_into().unwrap()))
    }

    // ---- typed messages ----

    pub fn get_features(&mut self) -> Result<u64, Refused> {
        self.ask_u64(req::GET_FEATURES)
    }

    pub fn set_features(&mut self, f: u64) -> Result<(), Refused> {
        self.features = f;
        self.call(req::SET_FEATURES, &f.to_le_bytes(), &[])
    }

    pub fn set_owner(&self) -> Result<(), Refused> {
        self.call(req::SET_OWNER, &[], &[])
    }

    pub fn get_protocol_features(&self) -> Result<u64, Refused> {
        self.ask_u64(req::GET_PROTOCOL_FEATURES)
    }

    /// Acks protocol features; REPLY_ACK applies from the next message on.
    pub fn set_protocol_features(&mut self, f: u64) -> Result<(), Refused> {
        self.call(req::SET_PROTOCOL_FEATURES, &f.to_le_bytes(), &[])?;
        self.protocol = f;
        Ok(())
    }

    pub fn get_queue_num(&self) -> Result<u64, Refused> {
        self.ask_u64(req::GET_QUEUE_NUM)
    }

    pub fn get_max_mem_slots(&self) -> Result<u64, Refused> {
        self.ask_u64(req::GET_MAX_MEM_SLOTS)
    }

    /// SET_MEM_TABLE with these regions (any number: the message is built as asked).
    pub fn set_mem_table(&self, regions: &[Region]) -> Result<(), Refused> {
        let mut p = Vec::new();
        p.extend_from_slice(&(regions.len() as u32).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for r in regions {
            p.extend_from_slice(&r.bytes());
        }
        let fds: Vec<RawFd> = regions.iter().map(|r| r.fd).collect();
        self.call(req::SET_MEM_TABLE, &p, &fds)
    }

    pub fn add_mem_reg(&self, r: &Region) -> Result<(), Refused> {
        let mut p = vec![0u8; 8];
        p.extend_from_slice(&r.bytes());
        self.call(req::ADD_MEM_REG, &p, &[r.fd])
    }

    fn state(index: u32, num: u32) -> [u8; 8] {
        let mut p = [0; 8];
        p[0..4].copy_from_slice(&index.to_le_bytes());
        p[4..8].copy_from_slice(&num.to_le_bytes());
        p
    }

    pub fn set_vring_num(&self, index: u32, num: u32) -> Result<(), Refused> {
        self.call(req::SET_VRING_NUM, &Self::state(index, num), &[])
    }

    pub fn set_vring_base(&self, index: u32, base: u32) -> Result<(), Refused> {
        self.call(req::SET_VRING_BASE, &Self::state(index, base), &[])
    }

    pub fn set_vring_enable(&self, index: u32, on: bool) -> Result<(), Refused> {
        self.call(req::SET_VRING_ENABLE, &Self::state(index, on as u32), &[])
    }

    /// GET_VRING_BASE: stops the ring and returns the back-end's next avail index.
    pub fn get_vring_base(&self, index: u32) -> Result<u32, Refused> {
        let (p, _) = self.ask(req::GET_VRING_BASE, &Self::state(index, 0), &[])?;
        Ok(u32::from_le_bytes(p[4..8].try_into().unwrap()))
    }

    /// SET_VRING_ADDR with front-end (host) addresses.
    pub fn set_vring_addr(
        &self,
        index: u32,
        desc: u64,
        used: u64,
        avail: u64,
    ) -> Result<(), Refused> {
        let mut p = Vec::new();
        p.extend_from_slice(&index.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for a in [desc, used, avail, 0] {
            p.extend_from_slice(&a.to_le_bytes());
        }
        self.call(req::SET_VRING_ADDR, &p, &[])
    }

    pub fn set_vring_kick(&self, index: u32, fd: RawFd) -> Result<(), Refused> {
        self.call(req::SET_VRING_KICK, &(index as u64).to_le_bytes(), &[fd])
    }

    pub fn set_vring_call(&self, index: u32, fd: RawFd) -> Result<(), Refused> {
        self.call(req::SET_VRING_CALL, &(index as u64).to_le_bytes(), &[fd])
    }

    /// GET_INFLIGHT_FD for `num_queues` queues of `queue_size`.
    pub fn get_inflight_fd(&mut self, num_queues: u16, queue_size: u16) -> Result<(), Refused> {
        let (p, mut fds) = self.ask(
            req::GET_INFLIGHT_FD,
            &inflight_msg(0, 0, num_queues, queue_size),
            &[],
        )?;
        if p.len() != 24 || fds.len() != 1 {
            return Err(Refused::Closed(format!(
                "GET_INFLIGHT_FD reply of {} bytes with {} fds",
                p.len(),
                fds.len()
            )));
        }
        self.inflight = Some(Inflight {
            file: fds.remove(0),
            size: u64::from_le_bytes(p[0..8].try_into().unwrap()),
            offset: u64::from_le_bytes(p[8..16].try_into().unwrap()),
            num_queues: u16::from_le_bytes(p[16..18].try_into().unwrap()),
            queue_size: u16::from_le_bytes(p[18..20].try_into().unwrap()),
        });
        Ok(())
    }

    /// SET_INFLIGHT_FD with the given values (normally those GET_INFLIGHT_FD returned).
    pub fn set_inflight_fd(
        &self,
        fd: RawFd,
        size: u64,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<(), Refused> {
        self.call(
            req::SET_INFLIGHT_FD,
            &inflight_msg(size, offset, num_queues, queue_size),
            &[fd],
        )
    }

    /// GET_CONFIG of `size` bytes at `offset`.
    pub fn get_config(&self, offset: u32, size: u32) -> Result<Vec<u8>, Refused> {
        let mut p = Vec::new();
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend(std::iter::repeat_n(0, size as usize));
        let (r, _) = self.ask(req::GET_CONFIG, &p, &[])?;
        Ok(r[12..].to_vec())
    }

    // ---- the well-behaved start ----

    /// Negotiates (everything offered, minus what `setup` excludes), announces `mem`, and sets
    /// up and enables `setup.queues` queues in QEMU's order. Panics on any refusal.
    pub fn start(&mut self, mem: &Memory, setup: &Setup) {
        self.negotiate(setup);
        self.set_mem_table(&[mem.region()])
            .unwrap_or_else(|e| panic!("SET_MEM_TABLE refused: {e:?}"));
        if setup.inflight {
            self.get_inflight_fd(setup.queues as u16, setup.queue_size)
                .unwrap_or_else(|e| panic!("GET_INFLIGHT_FD refused: {e:?}"));
            self.resend_inflight();
        }
        for q in 0..setup.queues {
            let place = if q == 0 {
                setup.place0
            } else {
                RingPlace::default()
            };
            let ring = Ring::new(mem, q as u32, setup.queue_size, place, setup.event_idx);
            self.queues.push(ring);
            self.start_queue(mem, q, setup.base);
        }
    }

    /// GET_FEATURES, SET_OWNER, protocol features, SET_FEATURES.
    pub fn negotiate(&mut self, setup: &Setup) {
        self.offered = self.get_features().expect("GET_FEATURES");
        self.set_owner().expect("SET_OWNER");
        assert!(
            self.offered & feat::PROTOCOL_FEATURES != 0,
            "no PROTOCOL_FEATURES offered"
        );
        let offered = self.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let mut want = proto::MQ | proto::REPLY_ACK | proto::CONFIG | proto::CONFIGURE_MEM_SLOTS;
        if setup.inflight {
            assert!(
                offered & proto::INFLIGHT_SHMFD != 0,
                "the back-end does not offer INFLIGHT_SHMFD (protocol features {offered:#x})"
            );
            want |= proto::INFLIGHT_SHMFD;
        }
        self.set_protocol_features(offered & want)
            .expect("SET_PROTOCOL_FEATURES");
        let mut f = self.offered & !setup.without;
        if !setup.event_idx {
            f &= !feat::RING_EVENT_IDX;
        }
        self.set_features(f).expect("SET_FEATURES");
    }

    /// SET_INFLIGHT_FD with the region this front-end holds (after a reconnect too).
    pub fn resend_inflight(&self) {
        let i = self.inflight.as_ref().expect("no in-flight region");
        self.set_inflight_fd(
            i.file.as_raw_fd(),
            i.size,
            i.offset,
            i.num_queues,
            i.queue_size,
        )
        .unwrap_or_else(|e| panic!("SET_INFLIGHT_FD refused: {e:?}"));
    }

    /// NUM, BASE, ADDR, CALL, KICK, ENABLE for queue `q` (its ring already in `self.queues`).
    pub fn start_queue(&self, mem: &Memory, q: usize, base: u16) {
        let r = &self.queues[q];
        let i = r.index;
        self.set_vring_num(i, r.size as u32)
            .unwrap_or_else(|e| panic!("SET_VRING_NUM {} refused: {e:?}", r.size));
        self.set_vring_base(i, base as u32).expect("SET_VRING_BASE");
        self.set_vring_addr(i, mem.va(r.desc), mem.va(r.used), mem.va(r.avail))
            .expect("SET_VRING_ADDR");
        self.set_vring_call(i, r.call.as_raw_fd())
            .expect("SET_VRING_CALL");
        self.set_vring_kick(i, r.kick.as_raw_fd())
            .expect("SET_VRING_KICK");
        self.set_vring_enable(i, true).expect("SET_VRING_ENABLE");
    }

    // ---- requests ----

    /// Submits `req` on queue `q` and kicks. Its data buffer is at `data`: the bytes read or
    /// written, the GET_ID string, or the 16-byte range of a discard or write-zeroes (unused by
    /// a flush). The header and status byte live in the ring's per-head slots.
    pub fn submit(&mut self, mem: &Memory, q: usize, req: &Blk, data: u64) -> Pending {
        let p = self.add(mem, q, req, data);
        self.kick(q);
        p
    }

    /// [`Frontend::submit`] without the kick.
    pub fn add(&mut self, mem: &Memory, q: usize, req: &Blk, data: u64) -> Pending {
        let ring = &mut self.queues[q];
        // The head is the next free descriptor: peek it to place header and status.
        let head = *ring.free.last().expect("no free descriptor");
        let hdr = ring.hdr_of(head);
        let status = ring.status_of(head);
        let (kind, sector, payload, len) = match req {
            Blk::Read { sector, len } => (blk::IN, *sector, Some(wr(data, *len)), *len),
            Blk::Write {
                sector,
                data: bytes,
            } => {
                mem.put(data, bytes);
                (
                    blk::OUT,
                    *sector,
                    Some(rd(data, bytes.len() as u32)),
                    bytes.len() as u32,
                )
            }
            Blk::Flush => (blk::FLUSH, 0, None, 0),
            Blk::GetId => (blk::GET_ID, 0, Some(wr(data, 20)), 20),
            Blk::Discard { sector, sectors }
            | Blk::WriteZeroes {
                sector, sectors, ..
            } => {
                let flags = matches!(req, Blk::WriteZeroes { unmap: true, .. }) as u32;
                let mut range = Vec::new();
                range.extend_from_slice(&sector.to_le_bytes());
                range.extend_from_slice(&sectors.to_le_bytes());
                range.extend_from_slice(&flags.to_le_bytes());
                mem.put(data, &range);
                let kind = if matches!(req, Blk::Discard { .. }) {
                    blk::DISCARD
                } else {
                    blk::WRITE_ZEROES
                };
                (kind, 0, Some(rd(data, 16)), 16)
            }
        };
        mem.put_u32(hdr, kind);
        mem.put_u32(hdr + 4, 0);
        mem.put_u64(hdr + 8, sector);
        mem.put(status, &[0xAA]);
        let mut segs = vec![rd(hdr, 16)];
        segs.extend(payload);
        segs.push(wr(status, 1));
        let got = ring.add(mem, &segs);
        assert_eq!(got, head);
        Pending {
            queue: q,
            head,
            data,
            len,
            status,
        }
    }

    pub fn kick(&self, q: usize) {
        self.queues[q].kick.write(1).unwrap();
    }

    /// Makes a read of `len` bytes at each of `sectors` available on queue `q` at once, each
    /// into a buffer of its own, and kicks once: many requests in flight together.
    pub fn reads(
        &mut self,
        mem: &Memory,
        q: usize,
        sectors: impl IntoIterator<Item = u64>,
        len: u32,
    ) -> Vec<Pending> {
        let reqs = sectors
            .into_iter()
            .map(|sector| {
                let buf = mem.alloc(u64::from(len), 4096);
                self.add(mem, q, &Blk::Read { sector, len }, buf)
            })
            .collect();
        self.kick(q);
        reqs
    }

    /// Waits for every request in flight on queue `q` to complete.
    pub fn drain(&mut self, mem: &Memory, q: usize) {
        while self.queues[q].in_flight() > 0 {
            self.wait(mem, q);
        }
    }

    /// Waits for the next completion on queue `q`: (head, used len); panics after [`TIMEOUT`].
    pub fn wait(&mut self, mem: &Memory, q: usize) -> (u16, u32) {
        self.queues[q].wait_used(mem, TIMEOUT).unwrap_or_else(|| {
            panic!(
                "queue {q}: no completion within {TIMEOUT:?} ({} in flight, used idx {})",
                self.queues[q].in_flight(),
                self.queues[q].used_idx(mem)
            )
        })
    }

    /// One request on queue `q` with its data in the ring's scratch buffer; waits for it and
    /// returns its status byte.
    pub fn request(&mut self, mem: &Memory, q: usize, req: &Blk) -> u8 {
        let scratch = self.queues[q].scratch;
        let p = self.submit(mem, q, req, scratch);
        let (head, _) = self.wait(mem, q);
        assert_eq!(head, p.head, "queue {q}: completion of another request");
        mem.get(p.status, 1)[0]
    }

    /// Writes `data` at `sector` on queue `q`; panics unless the status is OK.
    pub fn write(&mut self, mem: &Memory, q: usize, sector: u64, data: &[u8]) {
        assert!(data.len() as u64 <= self.queues[q].scratch_len);
        let st = self.request(
            mem,
            q,
            &Blk::Write {
                sector,
                data: data.to_vec(),
            },
        );
        assert_eq!(
            st,
            blk::S_OK,
            "write of {} bytes at sector {sector}",
            data.len()
        );
    }

    /// Reads `len` bytes at `sector` on queue `q`; panics unless the status is OK.
    pub fn read(&mut self, mem: &Memory, q: usize, sector: u64, len: u32) -> Vec<u8> {
        assert!(len as u64 <= self.queues[q].scratch_len);
        let st = self.request(mem, q, &Blk::Read { sector, len });
        assert_eq!(st, blk::S_OK, "read of {len} bytes at sector {sector}");
        mem.get(self.queues[q].scratch, len as usize)
    }
}

fn inflight_msg(size: u64, offset: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&size.to_le_bytes());
    p.extend_from_slice(&offset.to_le_bytes());
    p.extend_from_slice(&num_queues.to_le_bytes());
    p.extend_from_slice(&queue_size.to_le_bytes());
    p.extend_from_slice(&[0; 4]); // the C struct's tail padding
    p
}

/// Position-dependent bytes: data read from the wrong place does not match.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            ((seed.wrapping_mul(0x1000_0001) + i).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
        })
        .collect()
}

impl Frontend {
    /// Closes the connection (the back-end sees EOF).
    pub fn close(self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Whether the back-end has closed the connection (a read returns EOF or an error at once).
    pub fn closed_by_peer(&self) -> bool {
        self.sock.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let r = (&self.sock).read(&mut b);
        self.sock.set_nonblocking(false).unwrap();
        match r {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
}

/// Writes raw bytes to the socket (for truncated or garbage messages).
pub fn send_raw(f: &Frontend, bytes: &[u8]) -> std::io::Result<()> {
    (&f.sock).write_all(bytes)
}
