//! Hostile and malformed virtio-blk requests against the device: every case asserts the exact
//! status byte the device writes into guest memory (OK = 0, IOERR = 1, UNSUPP = 2) and the used
//! length, or that a chain without a device-writable byte is dropped (used length 0, nothing
//! written). After every hostile case the device must still serve a valid read.
//!
//! Most cases call [`BlockDevice::execute`] with hand-made descriptor lists over real guest
//! memory; the `queue_*` cases go through a real split virtqueue (a [`SplitRing`] laid out in
//! guest memory as the driver, the device's own [`Queue`] and `process_queue`), including
//! indirect tables, descriptor loops and bogus ring indices. The config space, the feature bits
//! and `set_config` are checked through `BlockDevice`.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_vhdx::backend::{BlockDevice, DeviceOptions};
use vhost_user_vhdx::queue::Queue;
use vhost_user_vhdx::vhdx::create::{create, CreateOptions};
use vhost_user_vhdx::vhdx::{Chain, ChainOptions};
use vhost_user_vhdx::virtio_blk::Descriptor;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::{
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_IOMMU_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const OK: u8 = 0;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;
/// What a status byte holds before the device answers: a dropped request leaves it.
const SENTINEL: u8 = 0xAA;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Guest memory: 16 MiB from 0.
const MEM_SIZE: u64 = 16 * MIB;
/// The split queue (a [`SplitRing`] at 0, 256 entries) ends before 0x2000.
const QUEUE_SIZE: u16 = 256;
/// Indirect descriptor tables.
const INDIRECT: u64 = 0x4000;
/// Request headers (and discard ranges right after them).
const HDR: u64 = 0x8000;
const STATUS: u64 = 0xF000;
/// Write payloads and GET_ID buffers.
const DATA: u64 = MIB;
/// Read buffers.
const DATA2: u64 = 8 * MIB;
/// What `assert_serving` uses.
const SERVE_HDR: u64 = 0x9000;
const SERVE_STATUS: u64 = 0xF800;
const SERVE_DATA: u64 = 15 * MIB;

const DISK: u64 = 64 * MIB;
const BLOCK: u32 = MIB as u32;
const SERIAL: &str = "vhdx-serial-0123";

// ---------------------------------------------------------------------------------------------
// Fixture.

struct Setup {
    virtual_size: u64,
    block_size: u32,
    logical_sector_size: u32,
    read_only: bool,
    writethrough: bool,
    serial: String,
    /// Write `pattern` to the first 2 MiB and the last 1 MiB before the device opens the image.
    prefill: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            virtual_size: DISK,
            block_size: BLOCK,
            logical_sector_size: 512,
            read_only: false,
            writethrough: false,
            serial: SERIAL.into(),
            prefill: true,
        }
    }
}

/// Position-dependent bytes: a byte read from the wrong place does not match.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect()
}

struct Dev {
    _dir: tempfile::TempDir,
    path: PathBuf,
    dev: Arc<BlockDevice>,
    mem: GuestMemoryMmap,
    capacity: u64,
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn device() -> Dev {
    device_with(Setup::default())
}

fn device_with(s: Setup) -> Dev {
    let dir = common::tempdir("virtio-");
    let path = dir.path().join("disk.vhdx");
    create(
        &path,
        &CreateOptions {
            virtual_size: Some(s.virtual_size),
            block_size: Some(s.block_size),
            logical_sector_size: Some(s.logical_sector_size),
            ..Default::default()
        },
    )
    .unwrap();
    if s.prefill {
        let chain = common::open_writable(&path);
        chain.write_at(&pattern(0, 2 * MIB as usize), 0).unwrap();
        let tail = s.virtual_size - MIB;
        chain.write_at(&pattern(tail, MIB as usize), tail).unwrap();
        chain.close().unwrap();
    }
    let chain = Chain::open(
        &path,
        &ChainOptions {
            writable: !s.read_only,
            ..Default::default()
        },
    )
    .unwrap();
    let dev = BlockDevice::new(
        Arc::new(chain),
        DeviceOptions {
            read_only: s.read_only,
            num_queues: 4,
            queue_size: QUEUE_SIZE as usize,
            serial: s.serial,
            writethrough: s.writethrough,
            aio: None,
            helper_threads: 1,
            poll: std::time::Duration::ZERO,
        },
    )
    .unwrap();
    Dev {
        _dir: dir,
        path,
        dev: Arc::new(dev),
        mem: guest_memory(),
        capacity: s.virtual_size,
    }
}

fn r(addr: u64, len: u32) -> Descriptor {
    Descriptor {
        addr: GuestAddress(addr),
        len,
        writable: false,
    }
}

fn w(addr: u64, len: u32) -> Descriptor {
    Descriptor {
        addr: GuestAddress(addr),
        len,
        writable: true,
    }
}

impl Dev {
    fn backend(&self) -> &BlockDevice {
        &self.dev
    }

    fn sectors(&self) -> u64 {
        self.capacity / 512
    }

    fn put(&self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    fn get(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn fill(&self, addr: u64, len: usize, byte: u8) {
        self.put(addr, &vec![byte; len]);
    }

    fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// A request header: type, reserved, sector.
    fn hdr_at(&self, addr: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.put(addr, &h);
    }

    fn hdr(&self, kind: u32, sector: u64) {
        self.hdr_at(HDR, kind, sector);
    }

    /// Arms the status byte at `status`, runs the chain, returns (used length, status byte).
    fn req(&self, descs: &[Descriptor], status: u64) -> (u32, u8) {
        self.put(status, &[SENTINEL]);
        let used = self.dev.execute(&self.mem, descs);
        (used, self.byte(status))
    }

    /// IN of `len` bytes at `sector` into DATA2.
    fn read_req(&self, sector: u64, len: u32) -> (u32, u8) {
        self.hdr(VIRTIO_BLK_T_IN, sector);
        self.req(&[r(HDR, 16), w(DATA2, len), w(STATUS, 1)], STATUS)
    }

    /// OUT of the `len` bytes at DATA to `sector`.
    fn write_req(&self, sector: u64, len: u32) -> (u32, u8) {
        self.hdr(VIRTIO_BLK_T_OUT, sector);
        self.req(&[r(HDR, 16), r(DATA, len), w(STATUS, 1)], STATUS)
    }

    /// A valid read: asserts OK and the used length, returns the bytes.
    fn read(&self, sector: u64, len: usize) -> Vec<u8> {
        self.fill(DATA2, len, 0x5A);
        assert_eq!(self.read_req(sector, len as u32), (len as u32 + 1, OK));
        self.get(DATA2, len)
    }

    /// A valid write: asserts OK and the used length.
    fn write(&self, sector: u64, data: &[u8]) {
        self.put(DATA, data);
        assert_eq!(self.write_req(sector, data.len() as u32), (1, OK));
    }

    /// A discard or write-zeroes request with `ranges` (sector, num_sectors, flags).
    fn ranges_req(&self, kind: u32, ranges: &[(u64, u32, u32)]) -> (u32, u8) {
        self.hdr(kind, 0);
        let mut payload = Vec::new();
        for &(sector, num, flags) in ranges {
            payload.extend_from_slice(&sector.to_le_bytes());
            payload.extend_from_slice(&num.to_le_bytes());
            payload.extend_from_slice(&flags.to_le_bytes());
        }
        self.put(HDR + 16, &payload);
        let len = 16 + payload.len() as u32;
        self.req(&[r(HDR, len), w(STATUS, 1)], STATUS)
    }

    /// What the image holds, read through the engine rather than the device.
    fn disk(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.dev.chain().read_at(&mut buf, offset).unwrap();
        buf
    }

    /// The device still serves: a valid 8 KiB read at sector 0 returns what the image holds.
    /// Uses its own header, buffer and status byte, so the case's request stays in place.
    fn assert_serving(&self) {
        self.hdr_at(SERVE_HDR, VIRTIO_BLK_T_IN, 0);
        self.fill(SERVE_DATA, 8192, 0x5A);
        self.put(SERVE_STATUS, &[SENTINEL]);
        let used = self.dev.execute(
            &self.mem,
            &[r(SERVE_HDR, 16), w(SERVE_DATA, 8192), w(SERVE_STATUS, 1)],
        );
        assert_eq!(
            (used, self.byte(SERVE_STATUS)),
            (8193, OK),
            "a valid read after a hostile request"
        );
        assert!(
            self.get(SERVE_DATA, 8192) == self.disk(0, 8192),
            "a valid read after a hostile request"
        );
    }

    /// The image file's length and a hash of its bytes (cheap to compare, short to print).
    fn file_bytes(&self) -> (usize, u64) {
        use std::hash::{Hash, Hasher};
        let bytes = std::fs::read(&self.path).unwrap();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        (bytes.len(), h.finish())
    }
}

// ---------------------------------------------------------------------------------------------
// Addresses outside guest memory.

#[test]
fn header_outside_guest_memory() {
    let d = device();
    for addr in [MEM_SIZE, MEM_SIZE - 8, u64::MAX - 15, u64::MAX - 7] {
        let (used, status) = d.req(&[r(addr, 16), w(DATA2, 512), w(STATUS, 1)], STATUS);
        assert_eq!((used, status), (1, IOERR), "header at {addr:#x}");
        d.assert_serving();
    }
    // The header's second half outside memory.
    d.put(MEM_SIZE - 8, &VIRTIO_BLK_T_IN.to_le_bytes());
    let (used, status) = d.req(
        &[
            r(MEM_SIZE - 8, 8),
            r(MEM_SIZE, 8),
            w(DATA2, 512),
            w(STATUS, 1),
        ],
        STATUS,
    );
    assert_eq!((used, status), (1, IOERR));
    d.assert_serving();
}

#[test]
fn data_outside_guest_memory() {
    let d = device();
    let before = d.disk(0, 4096);
    // Read into memory that is not there, or straddles its end.
    for (addr, len) in [
        (MEM_SIZE, 512u32),
        (MEM_SIZE - 512, 1024),
        (u64::MAX - 511, 512),
    ] {
        d.hdr(VIRTIO_BLK_T_IN, 0);
        let (used, status) = d.req(&[r(HDR, 16), w(addr, len), w(STATUS, 1)], STATUS);
        assert_eq!((used, status), (1, IOERR), "read into {addr:#x}+{len:#x}");
        d.assert_serving();
        // A write from there.
        d.hdr(VIRTIO_BLK_T_OUT, 0);
        let (used, status) = d.req(&[r(HDR, 16), r(addr, len), w(STATUS, 1)], STATUS);
        assert_eq!((used, status), (1, IOERR), "write from {addr:#x}+{len:#x}");
        d.assert_serving();
    }
    // A good segment followed by a bad one: nothing is written to the disk.
    d.fill(DATA, 512, 0x11);
    d.hdr(VIRTIO_BLK_T_OUT, 0);
    let (used, status) = d.req(
        &[r(HDR, 16), r(DATA, 512), r(MEM_SIZE, 512), w(STATUS, 1)],
        STATUS,
    );
    assert_eq!((used, status), (1, IOERR));
    assert_eq!(d.disk(0, 4096), before, "a refused write changed the disk");
    d.assert_serving();
}

#[test]
fn status_outside_guest_memory_is_dropped() {
    let d = device();
    d.hdr(VIRTIO_BLK_T_IN, 0);
    for status in [MEM_SIZE, MEM_SIZE + 4096, u64::MAX] {
        d.fill(DATA2, 512, 0x5A);
        let used = d
            .dev
            .execute(&d.mem, &[r(HDR, 16), w(DATA2, 512), w(status, 1)]);
        assert_eq!(used, 0, "status at {status:#x}");
        d.assert_serving();
    }
    // A status descriptor whose last byte is past the end of the address space.
    let used = d
        .dev
        .execute(&d.mem, &[r(HDR, 16), w(DATA2, 512), w(u64::MAX - 1, 16)]);
    assert_eq!(used, 0);
    d.assert_serving();
    // An unknown type whose status is outside memory: nothing written, nothing used.
    d.hdr(77, 0);
    let used = d.dev.execute(&d.mem, &[r(HDR, 16), w(MEM_SIZE + 1, 1)]);
    assert_eq!(used, 0);
    d.assert_serving();
}

#[test]
fn data_crossing_a_hole_between_memory_regions() {
    let mut d = device();
    // Two regions with a hole between them, and two adjacent regions.
    d.mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MEM_SIZE as usize),
        (GuestAddress(2 * MEM_SIZE), MEM_SIZE as usize),
        (GuestAddress(3 * MEM_SIZE), MEM_SIZE as usize),
    ])
    .unwrap();
    d.hdr(VIRTIO_BLK_T_IN, 0);
    let (used, status) = d.req(&[r(HDR, 16), w(MEM_SIZE - 512, 1024), w(STATUS, 1)], STATUS);
    assert_eq!((used, status), (1, IOERR));
    d.assert_serving();
    // Across the boundary of two adjacent regions: valid, and the bytes land in both.
    let at = 3 * MEM_SIZE - 1536;
    let (used, status) = d.req(&[r(HDR, 16), w(at, 4096), w(STATUS, 1)], STATUS);
    assert_eq!((used, status), (4097, OK));
    assert_eq!(d.get(at, 4096), pattern(0, 4096));
    // And a write from there.
    d.put(at, &pattern(777, 4096));
    d.hdr(VIRTIO_BLK_T_OUT, 64);
    let (used, status) = d.req(&[r(HDR, 16), r(at, 4096), w(STATUS, 1)], STATUS);
    assert_eq!((used, status), (1, OK));
    assert_eq!(d.disk(64 * 512, 4096), pattern(777, 4096));
    d.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// The header.

#[test]
fn header_too_short() {
    let d = device();
    d.hdr(VIRTIO_BLK_T_IN, 0);
    for len in [0u32, 1, 8, 15] {
        let (used, status) = d.req(&[r(HDR, len), w(DATA2, 512), w(STATUS, 1)], STATUS);
        assert_eq!((used, status), (1, IOERR), "header of {len} bytes");
        d.assert_serving();
    }
    // Split, but still short: 8 + 7 bytes.
    let (used, status) = d.req(
        &[r(HDR, 8), r(HDR + 8, 7), w(DATA2, 512), w(STATUS, 1)],
        STATUS,
    );
    assert_eq!((used, status), (1, IOERR));
    // Nothing readable at all: only a status.
    let (used, status) = d.req(&[w(STATUS, 1)], STATUS);
    assert_eq!((used, status), (1, IOERR));
    d.assert_serving();
}

#[test]
fn header_split_across_descriptors_is_valid() {
    let d = device();
    // Place the header's bytes in scattered places and describe them piece by piece.
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    header[8..16].copy_from_slice(&8u64.to_le_bytes());
    for cuts in [
        vec![8usize],
        vec![1],
        vec![15],
        vec![4, 8, 12],
        (1..16).collect(),
    ] {
        let mut descs = Vec::new();
        let mut start = 0;
        for (i, &end) in cuts.iter().chain(std::iter::once(&16)).enumerate() {
            let addr = HDR + 0x100 * i as u64;
            d.put(addr, &header[start..end]);
            descs.push(r(addr, (end - start) as u32));
            start = end;
        }
        descs.push(w(DATA2, 4096));
        descs.push(w(STATUS, 1));
        d.fill(DATA2, 4096, 0);
        assert_eq!(d.req(&descs, STATUS), (4097, OK), "header cut at {cuts:?}");
        assert_eq!(d.get(DATA2, 4096), pattern(8 * 512, 4096));
    }
    // An OUT whose header and data share one descriptor, and one whose data starts in the
    // header's second descriptor.
    d.hdr(VIRTIO_BLK_T_OUT, 100);
    d.put(HDR + 16, &pattern(1, 1024));
    assert_eq!(d.req(&[r(HDR, 16 + 1024), w(STATUS, 1)], STATUS), (1, OK));
    assert_eq!(d.disk(100 * 512, 1024), pattern(1, 1024));
    d.hdr(VIRTIO_BLK_T_OUT, 200);
    d.put(HDR + 16, &pattern(2, 1024));
    assert_eq!(
        d.req(
            &[
                r(HDR, 10),
                r(HDR + 10, 6 + 1000),
                r(HDR + 1016, 24),
                w(STATUS, 1)
            ],
            STATUS
        ),
        (1, OK)
    );
    assert_eq!(d.disk(200 * 512, 1024), pattern(2, 1024));
    // The status byte is the last byte of a larger writable descriptor.
    d.hdr(VIRTIO_BLK_T_IN, 0);
    d.put(DATA2 + 512, &[SENTINEL]);
    let used = d.dev.execute(&d.mem, &[r(HDR, 16), w(DATA2, 513)]);
    assert_eq!((used, d.byte(DATA2 + 512)), (513, OK));
    assert_eq!(d.get(DATA2, 512), pattern(0, 512));
    d.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// The status byte and the layout of the chain.

#[test]
fn chain_without_a_writable_byte_is_dropped() {
    let d = device();
    let before = d.file_bytes();
    d.fill(DATA2, 512, 0x33);
    let cases: Vec<(u32, Vec<Descriptor>)> = vec![
        (VIRTIO_BLK_T_IN, vec![]),
        (VIRTIO_BLK_T_IN, vec![r(HDR, 16)]),
        (VIRTIO_BLK_T_IN, vec![r(HDR, 16), r(DATA2, 512)]),
        // The status descriptor is device-readable.
        (VIRTIO_BLK_T_IN, vec![r(HDR, 16), r(STATUS, 1)]),
        (
            VIRTIO_BLK_T_OUT,
            vec![r(HDR, 16), r(DATA, 512), r(STATUS, 1)],
        ),
        (VIRTIO_BLK_T_FLUSH, vec![r(HDR, 16), r(STATUS, 1)]),
        (
            VIRTIO_BLK_T_GET_ID,
            vec![r(HDR, 16), r(DATA2, 20), r(STATUS, 1)],
        ),
        // Only zero-length writable descriptors.
        (VIRTIO_BLK_T_IN, vec![r(HDR, 16), w(DATA2, 0), w(STATUS, 0)]),
        (VIRTIO_BLK_T_IN, vec![w(STATUS, 0)]),
    ];
    for (kind, descs) in cases {
        d.hdr(kind, 0);
        d.fill(DATA, 512, 0x77);
        d.put(STATUS, &[SENTINEL]);
        assert_eq!(d.dev.execute(&d.mem, &descs), 0, "{descs:?}");
        assert_eq!(d.byte(STATUS), SENTINEL, "status written for {descs:?}");
        assert_eq!(
            d.get(DATA2, 512),
            vec![0x33; 512],
            "data written for {descs:?}"
        );
        d.assert_serving();
        d.fill(DATA2, 512, 0x33);
    }
    // No OUT without a status reached the image.
    assert_eq!(d.file_bytes(), before);
}

#[test]
fn status_descriptor_device_readable_after_writable_data() {
    let d = device();
    // IN whose status descriptor is readable: the last writable byte so far gets IOERR.
    d.hdr(VIRTIO_BLK_T_IN, 0);
    d.put(DATA2 + 511, &[SENTINEL]);
    d.put(STATUS, &[SENTINEL]);
    let used = d
        .dev
        .execute(&d.mem, &[r(HDR, 16), w(DATA2, 512), r(STATUS, 1)]);
    assert_eq!(used, 1);
    assert_eq!(d.byte(DATA2 + 511), IOERR);
    assert_eq!(d.byte(STATUS), SENTINEL);
    d.assert_serving();
}

#[test]
fn readable_descriptor_after_writable_one() {
    let d = device();
    let before = d.disk(0, 8192);
    for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH] {
        d.hdr(kind, 0);
        d.put(DATA2 + 511, &[SENTINEL]);
        let (used, status) = d.req(
            &[r(HDR, 16), w(DATA2, 512), r(DATA, 512), w(STATUS, 1)],
            STATUS,
        );
        // Answered at the last writable byte before the readable descriptor.
        assert_eq!((used, d.byte(DATA2 + 511)), (1, IOERR), "type {kind}");
        assert_eq!(status, SENTINEL, "type {kind}");
        d.assert_serving();
    }
    // The header itself after a writable descriptor.
    d.hdr(VIRTIO_BLK_T_IN, 0);
    d.put(DATA2, &[SENTINEL]);
    let used = d
        .dev
        .execute(&d.mem, &[w(DATA2, 1), r(HDR, 16), w(STATUS, 1)]);
    assert_eq!((used, d.byte(DATA2)), (1, IOERR));
    assert_eq!(d.disk(0, 8192), before);
    d.assert_serving();
}

#[test]
fn zero_length_descriptors_are_ignored() {
    let d = device();
    d.hdr(VIRTIO_BLK_T_IN, 0);
    let (used, status) = d.req(
        &[
            r(MEM_SIZE * 4, 0),
            r(HDR, 16),
            r(0, 0),
            w(u64::MAX, 0),
            w(DATA2, 4096),
            w(MEM_SIZE, 0),
            w(STATUS, 1),
            w(u64::MAX, 0),
        ],
        STATUS,
    );
    assert_eq!((used, status), (4097, OK));
    assert_eq!(d.get(DATA2, 4096), pattern(0, 4096));
    // A zero-length readable descriptor after the writable ones does not count as readable.
    let (used, status) = d.req(
        &[r(HDR, 16), w(DATA2, 512), r(DATA, 0), w(STATUS, 1)],
        STATUS,
    );
    assert_eq!((used, status), (513, OK));
    d.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// Disk ranges.

#[test]
fn sector_and_length_overflow() {
    let d = device();
    let before = d.file_bytes();
    d.fill(DATA, 1024, 0x99);
    for (sector, len) in [
        (u64::MAX, 512u32),
        (u64::MAX >> 9, 512),
        ((u64::MAX >> 9) - 1, 1024),
        ((u64::MAX >> 9) + 1, 512),
        (1 << 55, 512),
        (u64::MAX - 1, 0),
        (u64::MAX >> 9, 0),
    ] {
        assert_eq!(
            d.read_req(sector, len),
            (1, IOERR),
            "read {len} at {sector:#x}"
        );
        d.assert_serving();
        assert_eq!(
            d.write_req(sector, len),
            (1, IOERR),
            "write {len} at {sector:#x}"
        );
        d.assert_serving();
    }
    for sector in [u64::MAX, u64::MAX - 1, (u64::MAX >> 9) - 1] {
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            assert_eq!(d.ranges_req(kind, &[(sector, 8, 0)]), (1, IOERR));
            d.assert_serving();
        }
    }
    assert_eq!(d.file_bytes(), before);
}

#[test]
fn read_and_write_past_capacity_by_one_sector() {
    let d = device();
    let last = d.sectors() - 1;
    // The last sector is fine.
    assert_eq!(d.read(last, 512), pattern(DISK - 512, 512));
    d.write(last, &pattern(5, 512));
    assert_eq!(d.disk(DISK - 512, 512), pattern(5, 512));
    let before = d.file_bytes();
    d.fill(DATA, 1024, 0x42);
    for (sector, len) in [
        (last + 1, 512u32),
        (last, 1024),
        (last - 1, 1536),
        (last + 2, 512),
    ] {
        assert_eq!(
            d.read_req(sector, len),
            (1, IOERR),
            "read {len} at {sector}"
        );
        d.assert_serving();
        assert_eq!(
            d.write_req(sector, len),
            (1, IOERR),
            "write {len} at {sector}"
        );
        d.assert_serving();
    }
    for (sector, num) in [(last + 1, 1u32), (last, 2), (0, (DISK / 512) as u32 + 1)] {
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            assert_eq!(d.ranges_req(kind, &[(sector, num, 0)]), (1, IOERR));
            d.assert_serving();
        }
    }
    assert_eq!(d.file_bytes(), before);
    assert_eq!(d.disk(DISK - 512, 512), pattern(5, 512));
}

#[test]
fn length_not_a_multiple_of_512() {
    let d = device();
    let before = d.file_bytes();
    for len in [1u32, 100, 511, 513, 4095, 4097] {
        assert_eq!(d.read_req(0, len), (1, IOERR), "read of {len} bytes");
        d.assert_serving();
        assert_eq!(d.write_req(0, len), (1, IOERR), "write of {len} bytes");
        d.assert_serving();
    }
    // 512 bytes made of 511 + 2 with the status taking the last one: 512 of data, fine;
    // 511 + 1 + 1: 512 of data too; 510 + 1: 510, refused.
    d.hdr(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        d.req(&[r(HDR, 16), w(DATA2, 511), w(STATUS - 1, 2)], STATUS),
        (513, OK)
    );
    assert_eq!(
        d.req(&[r(HDR, 16), w(DATA2, 510), w(STATUS, 1)], STATUS),
        (1, IOERR)
    );
    assert_eq!(d.file_bytes(), before);
    d.assert_serving();
}

#[test]
fn misaligned_to_4k_logical_block() {
    let d = device_with(Setup {
        logical_sector_size: 4096,
        ..Default::default()
    });
    let before = d.file_bytes();
    d.fill(DATA, 8192, 0x24);
    for (sector, len) in [
        (1u64, 4096u32),
        (4, 4096),
        (7, 8192),
        (8, 512),
        (8, 2048),
        (0, 4608),
    ] {
        assert_eq!(
            d.read_req(sector, len),
            (1, IOERR),
            "read {len} at {sector}"
        );
        d.assert_serving();
        assert_eq!(
            d.write_req(sector, len),
            (1, IOERR),
            "write {len} at {sector}"
        );
        d.assert_serving();
    }
    for (sector, num) in [(1u64, 8u32), (8, 4), (8, 9), (4, 4)] {
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            assert_eq!(d.ranges_req(kind, &[(sector, num, 0)]), (1, IOERR));
            d.assert_serving();
        }
    }
    // Past the end by one logical block.
    let last = d.sectors() - 8;
    assert_eq!(d.read_req(last, 8192), (1, IOERR));
    assert_eq!(d.read(last, 4096), pattern(DISK - 4096, 4096));
    assert_eq!(d.file_bytes(), before);
    // Aligned requests work: 512-byte sectors, 4 KiB blocks.
    d.write(8, &pattern(3, 8192));
    assert_eq!(d.read(8, 8192), pattern(3, 8192));
    assert_eq!(
        d.ranges_req(VIRTIO_BLK_T_WRITE_ZEROES, &[(16, 8, 0)]),
        (1, OK)
    );
    assert_eq!(d.read(8, 8192)[4096..], vec![0u8; 4096][..]);
    // The config space speaks 512-byte sectors whatever the block size.
    let cfg = d.backend().get_config(0, 60);
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        DISK / 512
    );
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 4096);
}

#[test]
fn zero_length_read_and_write() {
    let d = device();
    // A zero-length write may still open the image's write session (header update), so the
    // disk's contents are compared, not the file's bytes.
    let before = d.disk(0, DISK as usize);
    let sectors = d.sectors();
    for sector in [0, 1, sectors - 1, sectors] {
        d.hdr(VIRTIO_BLK_T_IN, sector);
        assert_eq!(
            d.req(&[r(HDR, 16), w(STATUS, 1)], STATUS),
            (1, OK),
            "read at {sector}"
        );
        d.hdr(VIRTIO_BLK_T_OUT, sector);
        assert_eq!(
            d.req(&[r(HDR, 16), w(STATUS, 1)], STATUS),
            (1, OK),
            "write at {sector}"
        );
        d.assert_serving();
    }
    // Zero bytes past the end are still past the end.
    for sector in [sectors + 1, u64::MAX] {
        d.hdr(VIRTIO_BLK_T_IN, sector);
        assert_eq!(d.req(&[r(HDR, 16), w(STATUS, 1)], STATUS), (1, IOERR));
        d.hdr(VIRTIO_BLK_T_OUT, sector);
        assert_eq!(d.req(&[r(HDR, 16), w(STATUS, 1)], STATUS), (1, IOERR));
        d.assert_serving();
    }
    assert!(d.disk(0, DISK as usize) == before);
}

#[test]
fn huge_lengths() {
    let d = device();
    let before = d.file_bytes();
    // Four ~4 GiB writable descriptors: the sum overflows u32 many times over.
    d.hdr(VIRTIO_BLK_T_IN, 0);
    let mut descs = vec![r(HDR, 16)];
    descs.extend(std::iter::repeat_n(w(0, 0xFFFF_FE00), 4));
    descs.push(w(STATUS, 1));
    assert_eq!(d.req(&descs, STATUS), (1, IOERR));
    d.assert_serving();
    // Same with u32::MAX lengths (not sector multiples either).
    let mut descs = vec![r(HDR, 16)];
    descs.extend(std::iter::repeat_n(w(DATA2, u32::MAX), 3));
    descs.push(w(STATUS, 1));
    assert_eq!(d.req(&descs, STATUS), (1, IOERR));
    d.assert_serving();
    // Writes from huge readable descriptors.
    for len in [u32::MAX, 0xFFFF_FE00] {
        d.hdr(VIRTIO_BLK_T_OUT, 0);
        let mut descs = vec![r(HDR, 16)];
        descs.extend(std::iter::repeat_n(r(0, len), 3));
        descs.push(w(STATUS, 1));
        assert_eq!(d.req(&descs, STATUS), (1, IOERR));
        d.assert_serving();
    }
    // A discard payload of 4 GiB: refused before any range is read.
    d.hdr(VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        d.req(&[r(HDR, 16), r(0, 0xFFFF_FFF0), w(STATUS, 1)], STATUS),
        (1, IOERR)
    );
    // GET_ID into a 4 GiB buffer that is not in memory.
    d.hdr(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        d.req(&[r(HDR, 16), w(MEM_SIZE, u32::MAX), w(STATUS, 1)], STATUS),
        (1, IOERR)
    );
    assert_eq!(d.file_bytes(), before);
    d.assert_serving();
}

#[test]
fn huge_lengths_on_a_large_disk() {
    // A disk larger than 4 GiB, so the range check passes and the memory check must catch it.
    let d = device_with(Setup {
        virtual_size: 8 * GIB,
        block_size: 32 * MIB as u32,
        ..Default::default()
    });
    d.hdr(VIRTIO_BLK_T_IN, 0);
    let (used, status) = d.req(
        &[
            r(HDR, 16),
            w(MEM_SIZE, 0xFFFF_FE00),
            w(0, 0xFFFF_FE00),
            w(STATUS, 1),
        ],
        STATUS,
    );
    assert_eq!((used, status), (1, IOERR));
    d.assert_serving();
    // 257 descriptors of 16 MiB all over the same guest memory: 4 GiB + 16 MiB of reads, more
    // than a used length can say. It is served; the used length saturates at u32::MAX.
    d.hdr(VIRTIO_BLK_T_IN, 16);
    let mut descs = vec![r(HDR, 16)];
    descs.extend(std::iter::repeat_n(w(0, MEM_SIZE as u32), 257));
    descs.push(w(STATUS, 1));
    let (used, status) = d.req(&descs, STATUS);
    assert_eq!((used, status), (u32::MAX, OK));
    // The memory now holds the disk's bytes from 257 * 16 MiB - 16 MiB + 8 KiB on: zeros.
    assert_eq!(d.get(DATA2, 4096), vec![0u8; 4096]);
    d.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// Scatter-gather.

#[test]
fn more_data_segments_than_seg_max() {
    let d = device();
    let seg_max = u32::from_le_bytes(d.backend().get_config(12, 4).try_into().unwrap());
    assert_eq!(seg_max, 128);
    // 300 and 2000 segments of 512 bytes, each 1 KiB apart in guest memory; 2000 is also more
    // than the kernel's IOV_MAX (1024).
    for (n, sector) in [(300usize, 300u64), (2000, 4000)] {
        let data = pattern(n as u64 * 31, n * 512);
        let mut descs = vec![r(HDR, 16)];
        for i in 0..n {
            let at = DATA + i as u64 * 1024;
            d.put(at, &data[i * 512..(i + 1) * 512]);
            descs.push(r(at, 512));
        }
        descs.push(w(STATUS, 1));
        d.hdr(VIRTIO_BLK_T_OUT, sector);
        assert_eq!(d.req(&descs, STATUS), (1, OK), "{n}-segment write");
        assert_eq!(d.disk(sector * 512, n * 512), data);
        // Read back through as many segments, at other places.
        let mut descs = vec![r(HDR, 16)];
        for i in 0..n {
            descs.push(w(DATA2 + i as u64 * 1024 + 7, 512));
        }
        descs.push(w(STATUS, 1));
        d.hdr(VIRTIO_BLK_T_IN, sector);
        assert_eq!(
            d.req(&descs, STATUS),
            (n as u32 * 512 + 1, OK),
            "{n}-segment read"
        );
        for i in 0..n {
            assert_eq!(
                d.get(DATA2 + i as u64 * 1024 + 7, 512),
                data[i * 512..(i + 1) * 512],
                "segment {i} of {n}"
            );
        }
        d.assert_serving();
    }
}

/// Splits `len` bytes into tiny pieces of 1, 2, 3, 5, 7, 11 and 13 bytes, each placed `gap`
/// bytes after the previous one from `base`: (guest address, length).
fn tiny_pieces(base: u64, len: usize, gap: u64) -> Vec<(u64, usize)> {
    let sizes = [1usize, 2, 3, 5, 7, 11, 13];
    let mut out = Vec::new();
    let mut done = 0;
    let mut at = base;
    let mut i = 0;
    while done < len {
        let n = sizes[i % sizes.len()].min(len - done);
        out.push((at, n));
        at += n as u64 + gap;
        done += n;
        i += 1;
    }
    out
}

#[test]
fn data_scattered_over_tiny_descriptors() {
    let d = device();
    // 8 KiB at sector 2044: crosses the 1 MiB block boundary at sector 2048.
    let sector = 2044;
    let data = pattern(0xDEAD, 8192);
    let pieces = tiny_pieces(DATA, data.len(), 3);
    assert!(pieces.len() > 1000);
    let mut descs = vec![r(HDR, 16)];
    let mut done = 0;
    for &(at, n) in &pieces {
        d.put(at, &data[done..done + n]);
        descs.push(r(at, n as u32));
        done += n;
    }
    descs.push(w(STATUS, 1));
    d.hdr(VIRTIO_BLK_T_OUT, sector);
    assert_eq!(d.req(&descs, STATUS), (1, OK));
    assert_eq!(d.disk(sector * 512, 8192), data);
    // Read back into differently shaped tiny pieces.
    let pieces = tiny_pieces(DATA2 + 1, data.len(), 1);
    let mut descs = vec![r(HDR, 16)];
    for &(at, n) in &pieces {
        descs.push(w(at, n as u32));
    }
    descs.push(w(STATUS, 1));
    d.hdr(VIRTIO_BLK_T_IN, sector);
    assert_eq!(d.req(&descs, STATUS), (8193, OK));
    let mut got = Vec::new();
    for &(at, n) in &pieces {
        got.extend(d.get(at, n));
    }
    assert_eq!(got, data);
    // One byte per descriptor, 4 KiB of them, from prefilled data that spans the first block.
    let mut descs = vec![r(HDR, 16)];
    for i in 0..4096u64 {
        descs.push(w(DATA2 + 2 * i, 1));
    }
    descs.push(w(STATUS, 1));
    d.hdr(VIRTIO_BLK_T_IN, 8);
    assert_eq!(d.req(&descs, STATUS), (4097, OK));
    let got: Vec<u8> = (0..4096u64).map(|i| d.byte(DATA2 + 2 * i)).collect();
    assert_eq!(got, pattern(8 * 512, 4096));
    d.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// Discard and write-zeroes.

#[test]
fn discard_payload_not_a_multiple_of_16() {
    let d = device();
    let before = d.file_bytes();
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        d.hdr(kind, 0);
        // Ranges that would be valid, cut short.
        let mut payload = Vec::new();
        for i in 0..4u64 {
            payload.extend_from_slice(&(i * 2048).to_le_bytes());
            payload.extend_from_slice(&2048u32.to_le_bytes());
            payload.extend_from_slice(&0u32.to_le_bytes());
        }
        d.put(HDR + 16, &payload);
        for len in [0u32, 1, 8, 15, 17, 24, 63] {
            let (used, status) = d.req(&[r(HDR, 16 + len), w(STATUS, 1)], STATUS);
            assert_eq!((used, status), (1, IOERR), "type {kind}, payload {len}");
            d.assert_serving();
        }
        // The payload split across descriptors is fine when the total is right.
        let (used, status) = d.req(&[r(HDR, 16 + 5), r(HDR + 21, 11), w(STATUS, 1)], STATUS);
        assert_eq!((used, status), (1, OK));
    }
    // Both accepted requests covered block 0 (sectors 0..2048) of a prefilled disk: it now
    // reads zeros.
    assert_ne!(d.file_bytes(), before);
    assert_eq!(d.read(0, 4096), vec![0u8; 4096]);
    d.assert_serving();
}

#[test]
fn discard_with_more_than_64_ranges() {
    let d = device();
    let max_seg = u32::from_le_bytes(d.backend().get_config(40, 4).try_into().unwrap());
    assert_eq!(max_seg, 64);
    let ranges: Vec<(u64, u32, u32)> = (0..65).map(|i| (i * 8, 8, 0)).collect();
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        assert_eq!(d.ranges_req(kind, &ranges), (1, IOERR), "type {kind}");
        assert_eq!(d.disk(0, 65 * 4096), pattern(0, 65 * 4096));
        d.assert_serving();
    }
    // Exactly 64 is fine.
    assert_eq!(
        d.ranges_req(VIRTIO_BLK_T_WRITE_ZEROES, &ranges[..64]),
        (1, OK)
    );
    assert_eq!(d.disk(0, 64 * 4096), vec![0u8; 64 * 4096]);
    assert_eq!(d.disk(64 * 4096, 4096), pattern(64 * 4096, 4096));
    assert_eq!(d.ranges_req(VIRTIO_BLK_T_DISCARD, &ranges[..64]), (1, OK));
    d.assert_serving();
}

#[test]
fn discard_range_past_capacity_changes_nothing() {
    let d = device();
    let sectors = d.sectors();
    let before = d.file_bytes();
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        // A valid whole-block range first, then one past the end: nothing is done.
        for bad in [
            (sectors - 4, 8u32, 0u32),
            (sectors, 1, 0),
            (sectors - 2048, 2049, 0),
        ] {
            assert_eq!(
                d.ranges_req(kind, &[(0, 2048, 0), (2048, 2048, 0), bad]),
                (1, IOERR),
                "type {kind}, {bad:?}"
            );
            d.assert_serving();
        }
        // More than max_discard_sectors (1 GiB) in one range.
        assert_eq!(d.ranges_req(kind, &[(0, u32::MAX, 0)]), (1, IOERR));
        assert_eq!(d.ranges_req(kind, &[(0, (1 << 21) + 1, 0)]), (1, IOERR));
    }
    assert_eq!(d.file_bytes(), before);
    assert_eq!(d.disk(0, 2 * MIB as usize), pattern(0, 2 * MIB as usize));
    d.assert_serving();
}

/// A `kind` request whose range `first` has any of `flags` is UNSUPP, and so is one with `first`
/// unflagged followed by `second` flagged; the device keeps serving and the file is unchanged.
fn assert_flags_unsupported(
    d: &Dev,
    kind: u32,
    flags: &[u32],
    first: (u64, u32),
    second: (u64, u32),
) {
    let before = d.file_bytes();
    for &flags in flags {
        assert_eq!(
            d.ranges_req(kind, &[(first.0, first.1, flags)]),
            (1, UNSUPP),
            "flags {flags:#x}"
        );
        // A flagged range after a good one: nothing is done either.
        assert_eq!(
            d.ranges_req(kind, &[(first.0, first.1, 0), (second.0, second.1, flags)]),
            (1, UNSUPP)
        );
        d.assert_serving();
    }
    assert_eq!(d.file_bytes(), before);
}

#[test]
fn discard_with_flags_is_unsupported() {
    let d = device();
    assert_flags_unsupported(
        &d,
        VIRTIO_BLK_T_DISCARD,
        &[1, 2, 0x8000_0000, u32::MAX],
        (0, 2048),
        (2048, 2048),
    );
}

#[test]
fn discard_with_zero_sectors() {
    let d = device();
    let before = d.disk(0, DISK as usize);
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        for sector in [0, 1, 2047, d.sectors()] {
            assert_eq!(
                d.ranges_req(kind, &[(sector, 0, 0)]),
                (1, OK),
                "{kind} at {sector}"
            );
        }
        d.assert_serving();
    }
    assert!(d.disk(0, DISK as usize) == before);
    // A whole-block discard gives the block back: it reads as zeros.
    assert_eq!(
        d.ranges_req(VIRTIO_BLK_T_DISCARD, &[(2048, 2048, 0)]),
        (1, OK)
    );
    assert_eq!(d.read(2048, 4096), vec![0u8; 4096]);
    // A partial one leaves the data alone.
    assert_eq!(d.ranges_req(VIRTIO_BLK_T_DISCARD, &[(8, 8, 0)]), (1, OK));
    assert_eq!(d.read(8, 4096), pattern(4096, 4096));
    d.assert_serving();
}

#[test]
fn write_zeroes_flags() {
    let d = device();
    // UNMAP on a partial and on a whole block: fine, and zeros.
    assert_eq!(
        d.ranges_req(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[
                (10, 6, WRITE_ZEROES_UNMAP),
                (2048, 2048, WRITE_ZEROES_UNMAP)
            ]
        ),
        (1, OK)
    );
    assert_eq!(d.disk(10 * 512, 3072), vec![0u8; 3072]);
    assert_eq!(d.disk(MIB, MIB as usize), vec![0u8; MIB as usize]);
    assert_eq!(d.disk(16 * 512, 512), pattern(16 * 512, 512));
    d.assert_serving();
    // Unknown flag bits: UNSUPP, nothing zeroed.
    assert_flags_unsupported(
        &d,
        VIRTIO_BLK_T_WRITE_ZEROES,
        &[2, 3, 0x100, 0x8000_0001, u32::MAX],
        (100, 8),
        (200, 8),
    );
    assert_eq!(d.disk(100 * 512, 4096), pattern(100 * 512, 4096));
}

const WRITE_ZEROES_UNMAP: u32 = 1;

#[test]
fn write_zeroes_then_read_back_zeros() {
    let d = device();
    // Ranges inside a written block, across a block boundary, and in the written tail.
    let s = d.sectors();
    let ranges = [(3u64, 7u32, 0u32), (2040, 16, 0), (s - 3, 2, 0)];
    assert_eq!(d.ranges_req(VIRTIO_BLK_T_WRITE_ZEROES, &ranges), (1, OK));
    let mut expect0 = pattern(0, 2 * MIB as usize);
    for &(sector, num, _) in &ranges[..2] {
        let at = (sector * 512) as usize;
        expect0[at..at + num as usize * 512].fill(0);
    }
    assert_eq!(d.read(0, 8192), expect0[..8192]);
    assert_eq!(d.read(2032, 16384), expect0[2032 * 512..2032 * 512 + 16384]);
    let mut tail = pattern(DISK - 4096, 4096);
    tail[4096 - 1536..4096 - 512].fill(0);
    assert_eq!(d.read(s - 8, 4096), tail);
    // The guest's buffer is fully overwritten with zeros (it was 0x5A).
    assert_eq!(d.read(3, 3584), vec![0u8; 3584]);
    // And a block that was never written reads zeros after write-zeroes too.
    assert_eq!(
        d.ranges_req(VIRTIO_BLK_T_WRITE_ZEROES, &[(20000, 64, 0)]),
        (1, OK)
    );
    assert_eq!(d.read(20000, 32768), vec![0u8; 32768]);
    d.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// GET_ID, FLUSH and unknown types.

#[test]
fn get_id_buffers_of_20_10_and_0_bytes() {
    let d = device();
    let mut id = [0u8; 20];
    id[..SERIAL.len()].copy_from_slice(SERIAL.as_bytes());
    d.hdr(VIRTIO_BLK_T_GET_ID, 0);
    for len in [20usize, 10, 0, 1, 19] {
        d.fill(DATA, 64, 0xEE);
        let mut descs = vec![r(HDR, 16)];
        if len > 0 {
            descs.push(w(DATA, len as u32));
        }
        descs.push(w(STATUS, 1));
        assert_eq!(
            d.req(&descs, STATUS),
            (len as u32 + 1, OK),
            "{len}-byte buffer"
        );
        assert_eq!(d.get(DATA, len), id[..len]);
        assert_eq!(d.get(DATA + len as u64, 64 - len), vec![0xEE; 64 - len]);
        d.assert_serving();
    }
    // A larger buffer gets the 20 bytes, the rest untouched.
    d.fill(DATA, 64, 0xEE);
    assert_eq!(
        d.req(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], STATUS),
        (21, OK)
    );
    assert_eq!(d.get(DATA, 20), id);
    assert_eq!(d.get(DATA + 20, 44), vec![0xEE; 44]);
    // Split over three descriptors, the status in the last one.
    d.fill(DATA, 64, 0xEE);
    d.put(DATA + 40, &[SENTINEL]);
    let used = d.dev.execute(
        &d.mem,
        &[r(HDR, 16), w(DATA, 7), w(DATA + 20, 6), w(DATA + 30, 11)],
    );
    assert_eq!((used, d.byte(DATA + 40)), (21, OK));
    assert_eq!(d.get(DATA, 7), id[..7]);
    assert_eq!(d.get(DATA + 20, 6), id[7..13]);
    assert_eq!(d.get(DATA + 30, 7), id[13..20]);
    // Sector and readable payload are ignored.
    d.hdr(VIRTIO_BLK_T_GET_ID, u64::MAX);
    assert_eq!(
        d.req(
            &[r(HDR, 16), r(DATA2, 4096), w(DATA, 20), w(STATUS, 1)],
            STATUS
        ),
        (21, OK)
    );
    d.assert_serving();
}

#[test]
fn get_id_serial_is_cut_to_20_bytes() {
    let long = "0123456789abcdefghijKLMNOP";
    let d = device_with(Setup {
        serial: long.into(),
        prefill: false,
        ..Default::default()
    });
    d.hdr(VIRTIO_BLK_T_GET_ID, 0);
    d.fill(DATA, 64, 0xEE);
    assert_eq!(
        d.req(&[r(HDR, 16), w(DATA, 64), w(STATUS, 1)], STATUS),
        (21, OK)
    );
    assert_eq!(d.get(DATA, 20), long.as_bytes()[..20]);
    assert_eq!(d.get(DATA + 20, 44), vec![0xEE; 44]);
    d.assert_serving();
}

#[test]
fn get_id_buffer_outside_guest_memory() {
    let d = device();
    d.hdr(VIRTIO_BLK_T_GET_ID, 0);
    for (addr, len) in [(MEM_SIZE, 20u32), (MEM_SIZE - 10, 20), (u64::MAX - 9, 20)] {
        d.fill(DATA, 64, 0xEE);
        let (used, status) = d.req(
            &[r(HDR, 16), w(DATA, 5), w(addr, len), w(STATUS, 1)],
            STATUS,
        );
        assert_eq!((used, status), (1, IOERR), "id buffer at {addr:#x}");
        d.assert_serving();
    }
}

#[test]
fn flush_with_data_descriptors() {
    let d = device();
    let before = d.file_bytes();
    d.fill(DATA, 512, 0x31);
    d.fill(DATA2, 512, 0x32);
    for sector in [0, 12345, u64::MAX] {
        d.hdr(VIRTIO_BLK_T_FLUSH, sector);
        let (used, status) = d.req(
            &[r(HDR, 16), r(DATA, 512), w(DATA2, 512), w(STATUS, 1)],
            STATUS,
        );
        assert_eq!((used, status), (1, OK), "flush at {sector}");
        // Neither written to the disk nor to the guest.
        assert_eq!(d.get(DATA2, 512), vec![0x32; 512]);
        // A header longer than 16 bytes, and no data.
        assert_eq!(d.req(&[r(HDR, 64), w(STATUS, 1)], STATUS), (1, OK));
        d.assert_serving();
    }
    assert_eq!(d.file_bytes(), before);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let d = device();
    let before = d.file_bytes();
    for kind in [
        2u32,
        3,
        5,
        6,
        7,
        9,
        10,
        12,
        14,
        15,
        16,
        18,
        20,
        22,
        24,
        26,
        0x8000_0000,
        0x8000_0001,
        0xffff_ffff,
    ] {
        d.hdr(kind, 0);
        d.fill(DATA2, 512, 0x44);
        assert_eq!(
            d.req(
                &[r(HDR, 16), r(DATA, 512), w(DATA2, 512), w(STATUS, 1)],
                STATUS
            ),
            (1, UNSUPP),
            "type {kind:#x}"
        );
        assert_eq!(d.get(DATA2, 512), vec![0x44; 512]);
        assert_eq!(d.req(&[r(HDR, 16), w(STATUS, 1)], STATUS), (1, UNSUPP));
        d.assert_serving();
    }
    // The reserved field of the header is ignored.
    d.hdr(VIRTIO_BLK_T_IN, 0);
    d.put(HDR + 4, &0xdead_beefu32.to_le_bytes());
    assert_eq!(
        d.req(&[r(HDR, 16), w(DATA2, 512), w(STATUS, 1)], STATUS),
        (513, OK)
    );
    assert_eq!(d.file_bytes(), before);
}

// ---------------------------------------------------------------------------------------------
// Read-only devices.

fn read_only_device() -> Dev {
    device_with(Setup {
        read_only: true,
        ..Default::default()
    })
}

#[test]
fn read_only_refuses_out_discard_write_zeroes() {
    let d = read_only_device();
    let before = d.file_bytes();
    d.put(DATA, &pattern(9, 4096));
    for sector in [0u64, 8, d.sectors() - 8] {
        assert_eq!(d.write_req(sector, 4096), (1, IOERR), "write at {sector}");
        d.assert_serving();
    }
    // Even a zero-length write.
    d.hdr(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(d.req(&[r(HDR, 16), w(STATUS, 1)], STATUS), (1, IOERR));
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        for flags in [0, WRITE_ZEROES_UNMAP] {
            assert_eq!(
                d.ranges_req(kind, &[(0, 2048, flags)]),
                (1, IOERR),
                "{kind}"
            );
            d.assert_serving();
        }
    }
    assert_eq!(
        d.file_bytes(),
        before,
        "a read-only device changed its file"
    );
    assert_eq!(d.disk(0, 2 * MIB as usize), pattern(0, 2 * MIB as usize));
}

#[test]
fn read_only_serves_in_flush_and_get_id() {
    let d = read_only_device();
    let before = d.file_bytes();
    assert_eq!(d.read(0, 65536), pattern(0, 65536));
    assert_eq!(
        d.read(d.sectors() - 128, 65536),
        pattern(DISK - 65536, 65536)
    );
    // Never written: zeros.
    assert_eq!(d.read(10000, 4096), vec![0u8; 4096]);
    d.hdr(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(d.req(&[r(HDR, 16), w(STATUS, 1)], STATUS), (1, OK));
    d.hdr(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        d.req(&[r(HDR, 16), w(DATA, 20), w(STATUS, 1)], STATUS),
        (21, OK)
    );
    assert_eq!(d.get(DATA, SERIAL.len()), SERIAL.as_bytes());
    // Hostile reads answer as on a writable device.
    assert_eq!(d.read_req(d.sectors(), 512), (1, IOERR));
    assert_eq!(d.read_req(0, 100), (1, IOERR));
    d.hdr(42, 0);
    assert_eq!(d.req(&[r(HDR, 16), w(STATUS, 1)], STATUS), (1, UNSUPP));
    let f = d.backend().features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(d.file_bytes(), before);
}

// ---------------------------------------------------------------------------------------------
// Data integrity.

#[test]
fn writes_then_reads_of_known_patterns() {
    let d = device();
    let mut model = vec![0u8; DISK as usize];
    model[..2 * MIB as usize].copy_from_slice(&pattern(0, 2 * MIB as usize));
    let tail = (DISK - MIB) as usize;
    model[tail..].copy_from_slice(&pattern(DISK - MIB, MIB as usize));
    let mut rng = StdRng::seed_from_u64(0x7669_7274_696f);
    let sectors = d.sectors();
    for step in 0..300 {
        let n = rng.gen_range(1..=128u64);
        // Bias towards block boundaries and the ends of the disk.
        let sector = match rng.gen_range(0..4) {
            0 => rng.gen_range(0..=sectors - n),
            1 => (rng.gen_range(1..DISK / MIB) * 2048).saturating_sub(rng.gen_range(0..n)),
            2 => sectors - n,
            _ => rng.gen_range(0..8),
        };
        let at = (sector * 512) as usize;
        let len = (n * 512) as usize;
        match rng.gen_range(0..5) {
            0 | 1 => {
                let mut data = vec![0u8; len];
                rng.fill(&mut data[..]);
                d.write(sector, &data);
                model[at..at + len].copy_from_slice(&data);
            }
            2 => {
                assert_eq!(
                    d.ranges_req(VIRTIO_BLK_T_WRITE_ZEROES, &[(sector, n as u32, 0)]),
                    (1, OK)
                );
                model[at..at + len].fill(0);
            }
            _ => {
                assert_eq!(d.read(sector, len), model[at..at + len], "step {step}");
            }
        }
    }
    // Everything, through the device in 4 MiB reads, and through the engine.
    for chunk in 0..DISK / (4 * MIB) {
        let at = (chunk * 4 * MIB) as usize;
        let got = d.read(chunk * 8192, 4 * MIB as usize);
        assert!(got == model[at..at + 4 * MIB as usize], "chunk {chunk}");
    }
    assert!(d.disk(0, DISK as usize) == model);
    // And after closing and reopening the image.
    let path = d.path.clone();
    drop(d.dev);
    let chain = Chain::open(&path, &ChainOptions::default()).unwrap();
    let mut all = vec![0u8; DISK as usize];
    chain.read_at(&mut all, 0).unwrap();
    assert!(all == model, "the reopened image differs");
}

#[test]
fn writethrough_device_serves_writes() {
    let d = device_with(Setup {
        writethrough: true,
        ..Default::default()
    });
    assert_eq!(d.backend().get_config(32, 1), vec![0]);
    d.write(40, &pattern(40, 8192));
    assert_eq!(d.read(40, 8192), pattern(40, 8192));
    assert_eq!(
        d.ranges_req(VIRTIO_BLK_T_WRITE_ZEROES, &[(40, 8, 0)]),
        (1, OK)
    );
    assert_eq!(d.read(40, 4096), vec![0u8; 4096]);
    d.assert_serving();
}

// ---------------------------------------------------------------------------------------------
// Config space and features.

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

#[test]
fn config_space_fields() {
    for (lss, block) in [(512u32, MIB as u32), (4096, 32 * MIB as u32)] {
        let d = device_with(Setup {
            logical_sector_size: lss,
            block_size: block,
            prefill: false,
            ..Default::default()
        });
        let b = d.backend();
        let c = b.get_config(0, 60);
        assert_eq!(c, d.dev.config_bytes());
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            DISK / 512,
            "capacity"
        );
        assert_eq!(le32(&c, 8), 0, "size_max");
        assert_eq!(le32(&c, 12), 128, "seg_max");
        assert_eq!((le16(&c, 16), c[18], c[19]), (0, 0, 0), "geometry");
        assert_eq!(le32(&c, 20), lss, "blk_size");
        // The image's physical sector size is 4096.
        assert_eq!(
            c[24],
            (4096 / lss).trailing_zeros() as u8,
            "physical_block_exp"
        );
        assert_eq!(c[25], 0, "alignment_offset");
        assert_eq!(le16(&c, 26), 1, "min_io_size");
        assert_eq!(le32(&c, 28), block / lss, "opt_io_size");
        assert_eq!(c[32], 1, "wce: writeback by default");
        assert_eq!(le16(&c, 34), 4, "num_queues");
        assert_eq!(le32(&c, 36), 1 << 21, "max_discard_sectors");
        assert_eq!(le32(&c, 40), 64, "max_discard_seg");
        assert_eq!(le32(&c, 44), block / 512, "discard_sector_alignment");
        assert_eq!(le32(&c, 48), 1 << 21, "max_write_zeroes_sectors");
        assert_eq!(le32(&c, 52), 64, "max_write_zeroes_seg");
        assert_eq!(c[56], 1, "write_zeroes_may_unmap");
        assert_eq!(b.num_queues(), 4);
        assert_eq!(b.max_queue_size(), QUEUE_SIZE as usize);
    }
}

#[test]
fn config_space_odd_offsets_and_sizes() {
    let d = device();
    let b = d.backend();
    let full = d.dev.config_bytes();
    assert_eq!(full.len(), 60);
    let expect = |offset: u32, size: u32| -> Vec<u8> {
        (0..size as u64)
            .map(|i| {
                let at = offset as u64 + i;
                full.get(at as usize).copied().unwrap_or(0)
            })
            .collect()
    };
    for offset in 0..=80u32 {
        for size in 0..=80u32 {
            assert_eq!(
                b.get_config(offset, size),
                expect(offset, size),
                "{offset}+{size}"
            );
        }
    }
    // What vhost-user allows (offset + size up to 4096), and beyond.
    for (offset, size) in [
        (0u32, 4096u32),
        (59, 4037),
        (60, 256),
        (4095, 1),
        (4096, 16),
        (0x8000_0000, 8),
        (u32::MAX - 3, 8),
        (u32::MAX, 4096),
    ] {
        let got = b.get_config(offset, size);
        assert_eq!(got, expect(offset, size), "{offset:#x}+{size}");
    }
    // Never-set fields stay zero; out-of-range reads are all zeros.
    assert_eq!(b.get_config(60, 64), vec![0u8; 64]);
    assert_eq!(b.get_config(u32::MAX, 1), vec![0]);
    d.assert_serving();
}

#[test]
fn set_config_toggles_writeback_and_refuses_the_rest() {
    let d = device();
    let b = d.backend();
    let original = d.dev.config_bytes();
    assert_eq!(b.get_config(32, 1), vec![1]);
    // Writethrough, then writes still work (each one flushed).
    b.set_config(32, &[0]).unwrap();
    assert_eq!(b.get_config(32, 1), vec![0]);
    d.write(64, &pattern(64, 4096));
    assert_eq!(d.read(64, 4096), pattern(64, 4096));
    // Any non-zero value means writeback; the config reads 1.
    b.set_config(32, &[0x80]).unwrap();
    assert_eq!(b.get_config(32, 1), vec![1]);
    b.set_config(32, &[1]).unwrap();
    assert_eq!(d.dev.config_bytes(), original);
    // Every other offset, and the WCE byte with a wrong size, are refused and change nothing.
    for (offset, buf) in [
        (0u32, vec![0u8; 8]),
        (0, vec![0xff; 60]),
        (12, vec![0xff; 4]),
        (20, vec![0; 4]),
        (31, vec![0, 0]),
        (31, vec![0]),
        (33, vec![0]),
        (34, vec![0xff, 0xff]),
        (32, vec![]),
        (32, vec![0, 0]),
        (32, vec![0; 4096]),
        (56, vec![0]),
        (60, vec![1]),
        (4096, vec![0]),
        (u32::MAX, vec![0]),
    ] {
        assert!(
            b.set_config(offset, &buf).is_err(),
            "set_config({offset}, {} bytes) was accepted",
            buf.len()
        );
        assert_eq!(
            d.dev.config_bytes(),
            original,
            "set_config({offset}) changed it"
        );
    }
    d.assert_serving();
}

#[test]
fn features_offered() {
    let must = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
    ];
    let never = [
        VIRTIO_F_RING_PACKED,
        VIRTIO_F_IOMMU_PLATFORM,
        VIRTIO_F_ACCESS_PLATFORM,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_GEOMETRY,
        VIRTIO_BLK_F_SCSI,
        VIRTIO_BLK_F_BARRIER,
        VIRTIO_BLK_F_SECURE_ERASE,
        VIRTIO_BLK_F_ZONED,
    ];
    for read_only in [false, true] {
        let d = device_with(Setup {
            read_only,
            prefill: false,
            ..Default::default()
        });
        let f = d.backend().features();
        for bit in must {
            assert_ne!(
                f & (1u64 << bit),
                0,
                "feature bit {bit} missing (ro {read_only})"
            );
        }
        for bit in never {
            assert_eq!(
                f & (1u64 << bit),
                0,
                "feature bit {bit} offered (ro {read_only})"
            );
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO) != 0, read_only, "RO");
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        let p = d.backend().protocol_features();
        for needed in [
            VhostUserProtocolFeatures::CONFIG,
            VhostUserProtocolFeatures::MQ,
            VhostUserProtocolFeatures::REPLY_ACK,
            VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        ] {
            assert!(p.contains(needed), "protocol feature {needed:?} missing");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Through a real split virtqueue.

/// The driver's side of a split virtqueue in guest memory (virtio 1.2 §2.7), as a guest's
/// driver lays it out: the descriptor table at `base`, the available ring right after it, the
/// used ring after that at 4-byte alignment. Written and read with plain little-endian stores,
/// so that the device's ring code is judged by an independent picture of the layout.
struct SplitRing<'a> {
    mem: &'a GuestMemoryMmap,
    base: u64,
    size: u16,
}

impl<'a> SplitRing<'a> {
    /// A ring of `size` entries at `base`, its indexes and flags zero.
    fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> SplitRing<'a> {
        let r = SplitRing { mem, base, size };
        let end = r.used_addr().0 + 6 + 8 * u64::from(size);
        mem.write_slice(&vec![0u8; (end - base) as usize], GuestAddress(base))
            .unwrap();
        r
    }

    fn desc_table_addr(&self) -> GuestAddress {
        GuestAddress(self.base)
    }

    fn avail_addr(&self) -> GuestAddress {
        GuestAddress(self.base + 16 * u64::from(self.size))
    }

    fn used_addr(&self) -> GuestAddress {
        GuestAddress((self.avail_addr().0 + 6 + 2 * u64::from(self.size)).next_multiple_of(4))
    }

    fn store_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(
            self.mem,
            self.base + 16 * u64::from(index),
            (addr, len, flags, next),
        );
    }

    fn avail_idx(&self) -> u16 {
        self.mem
            .read_obj(self.avail_addr().unchecked_add(2))
            .unwrap()
    }

    fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, self.avail_addr().unchecked_add(2))
            .unwrap();
    }

    /// Puts `head` into the available ring's entry `slot` (modulo the size).
    fn set_avail_entry(&self, slot: u16, head: u16) {
        let at = 4 + 2 * u64::from(slot % self.size);
        self.mem
            .write_obj(head, self.avail_addr().unchecked_add(at))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(self.used_addr().unchecked_add(2))
            .unwrap()
    }

    /// The used ring's entry `slot` (modulo the size): (id, len).
    fn used_entry(&self, slot: u16) -> (u32, u32) {
        let at = self
            .used_addr()
            .unchecked_add(4 + 8 * u64::from(slot % self.size));
        (
            self.mem.read_obj(at).unwrap(),
            self.mem.read_obj(at.unchecked_add(4)).unwrap(),
        )
    }
}

/// Writes a split descriptor (address, length, flags, next) at `gpa`.
fn write_desc(mem: &GuestMemoryMmap, gpa: u64, (addr, len, flags, next): (u64, u32, u16, u16)) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(gpa)).unwrap();
}

/// The guest's side of one split queue (a [`SplitRing`] at 0) and the device's side
/// (a Queue set up the way the vhost-user handler does).
struct Rig<'a> {
    d: &'a Dev,
    ring: SplitRing<'a>,
    vring: Arc<Queue>,
    next_desc: u16,
    /// Used entries already looked at.
    seen: u16,
}

/// A descriptor as the driver writes it: address, length, flags (NEXT is added as needed).
type D = (u64, u32, u16);
const RO: u16 = 0;
const WO: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const IND: u16 = VRING_DESC_F_INDIRECT as u16;

impl<'a> Rig<'a> {
    fn new(d: &'a Dev) -> Rig<'a> {
        let ring = SplitRing::new(&d.mem, 0, QUEUE_SIZE);
        let vring = Arc::new(Queue::new(0, QUEUE_SIZE).unwrap());
        Self::setup(&vring, &ring, &d.mem);
        Rig {
            d,
            ring,
            vring,
            next_desc: 0,
            seen: 0,
        }
    }

    /// What the vhost-user handler does for SET_VRING_NUM/ADDR/BASE, memory, KICK and ENABLE.
    fn setup(q: &Queue, ring: &SplitRing<'_>, mem: &GuestMemoryMmap) {
        let mut st = q.lock();
        st.ring.size = QUEUE_SIZE;
        st.ring.desc = ring.desc_table_addr();
        st.ring.avail = ring.avail_addr();
        st.ring.used = ring.used_addr();
        st.ring.set_next_avail(ring.avail_idx());
        st.ring.set_next_used(ring.used_idx());
        st.reinit();
        st.addresses_set = true;
        st.set_mem(Arc::new(mem.clone()));
        st.set_kick(None);
        st.set_enabled(true);
    }

    /// The VMM stops the ring (GET_VRING_BASE) and sets it up again.
    fn reinit(&mut self) {
        self.vring.stop(false);
        Self::setup(&self.vring, &self.ring, &self.d.mem);
    }

    fn store(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.ring.store_desc(index, addr, len, flags, next);
    }

    fn publish(&self, head: u16) {
        let idx = self.ring.avail_idx();
        self.ring.set_avail_entry(idx, head);
        self.ring.set_avail_idx(idx.wrapping_add(1));
    }

    fn alloc(&mut self, n: usize) -> Vec<u16> {
        (0..n)
            .map(|_| {
                let i = self.next_desc;
                self.next_desc = (self.next_desc + 1) % QUEUE_SIZE;
                i
            })
            .collect()
    }

    /// Writes a direct chain and makes it available; returns its head.
    fn chain(&mut self, descs: &[D]) -> u16 {
        let idx = self.alloc(descs.len());
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = match idx.get(k + 1) {
                Some(&n) => (flags | NEXT, n),
                None => (flags, 0),
            };
            self.store(idx[k], addr, len, flags, next);
        }
        self.publish(idx[0]);
        idx[0]
    }

    /// Writes `descs` as an indirect table at `table` and makes a one-descriptor chain
    /// pointing at it available; returns the head.
    fn indirect(&mut self, table: u64, descs: &[D]) -> u16 {
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = if k + 1 < descs.len() {
                (flags | NEXT, k as u16 + 1)
            } else {
                (flags, 0)
            };
            write_desc(&self.d.mem, table + 16 * k as u64, (addr, len, flags, next));
        }
        let head = self.alloc(1)[0];
        self.store(head, table, 16 * descs.len() as u32, IND, 0);
        self.publish(head);
        head
    }

    /// Lets the device process the queue; returns the new used entries (id, len).
    fn run(&mut self) -> Vec<(u32, u32)> {
        self.d.dev.process_queue(&self.vring);
        let idx = self.ring.used_idx();
        let mut out = Vec::new();
        while self.seen != idx {
            out.push(self.ring.used_entry(self.seen));
            self.seen = self.seen.wrapping_add(1);
        }
        out
    }

    /// A valid 4 KiB read of sector 0 through the queue.
    fn assert_serving(&mut self) {
        self.d.hdr_at(HDR + 0x800, VIRTIO_BLK_T_IN, 0);
        self.d.fill(DATA2, 4096, 0x5A);
        self.d.put(STATUS + 0x10, &[SENTINEL]);
        let head = self.chain(&[
            (HDR + 0x800, 16, RO),
            (DATA2, 4096, WO),
            (STATUS + 0x10, 1, WO),
        ]);
        assert_eq!(self.run(), vec![(u32::from(head), 4097)]);
        assert_eq!(self.d.byte(STATUS + 0x10), OK);
        assert_eq!(self.d.get(DATA2, 4096), self.d.disk(0, 4096));
    }
}

#[test]
fn queue_write_then_read_round_trip() {
    let d = device();
    let mut q = Rig::new(&d);
    d.hdr_at(HDR, VIRTIO_BLK_T_OUT, 300);
    d.put(DATA, &pattern(300, 16384));
    d.put(STATUS, &[SENTINEL]);
    let h1 = q.chain(&[
        (HDR, 16, RO),
        (DATA, 8192, RO),
        (DATA + 8192, 8192, RO),
        (STATUS, 1, WO),
    ]);
    d.hdr_at(HDR + 16, VIRTIO_BLK_T_IN, 300);
    d.put(STATUS + 1, &[SENTINEL]);
    let h2 = q.chain(&[(HDR + 16, 16, RO), (DATA2, 16384, WO), (STATUS + 1, 1, WO)]);
    assert_eq!(q.run(), vec![(u32::from(h1), 1), (u32::from(h2), 16385)]);
    assert_eq!((d.byte(STATUS), d.byte(STATUS + 1)), (OK, OK));
    assert_eq!(d.get(DATA2, 16384), pattern(300, 16384));
    q.assert_serving();
}

#[test]
fn queue_indirect_descriptors() {
    let d = device();
    let mut q = Rig::new(&d);
    // Write and read back through indirect tables, the read with 200 segments (> seg_max).
    d.hdr_at(HDR, VIRTIO_BLK_T_OUT, 512);
    d.put(DATA, &pattern(512, 4096));
    d.put(STATUS, &[SENTINEL]);
    let h = q.indirect(
        INDIRECT,
        &[(HDR, 16, RO), (DATA, 4096, RO), (STATUS, 1, WO)],
    );
    assert_eq!(q.run(), vec![(u32::from(h), 1)]);
    assert_eq!(d.byte(STATUS), OK);
    d.hdr_at(HDR, VIRTIO_BLK_T_IN, 512);
    let mut table = vec![(HDR, 16, RO)];
    for i in 0..200u64 {
        table.push((
            DATA2 + i * 64,
            if i < 199 { 16 } else { 4096 - 199 * 16 },
            WO,
        ));
    }
    table.push((STATUS, 1, WO));
    let h = q.indirect(INDIRECT + 0x100, &table);
    assert_eq!(q.run(), vec![(u32::from(h), 4097)]);
    assert_eq!(d.byte(STATUS), OK);
    let mut got = Vec::new();
    for i in 0..199u64 {
        got.extend(d.get(DATA2 + i * 64, 16));
    }
    got.extend(d.get(DATA2 + 199 * 64, 4096 - 199 * 16));
    assert_eq!(got, pattern(512, 4096));
    // An indirect descriptor in the middle of a direct chain (with NEXT set) is followed.
    d.hdr_at(HDR, VIRTIO_BLK_T_IN, 0);
    for (k, &(addr, len, flags)) in [(DATA2, 512u32, WO), (STATUS, 1, WO)].iter().enumerate() {
        let next_flag = if k == 0 { NEXT } else { 0 };
        write_desc(
            &d.mem,
            INDIRECT + 0x2000 + 16 * k as u64,
            (addr, len, flags | next_flag, 1),
        );
    }
    let h = q.chain(&[(HDR, 16, RO), (INDIRECT + 0x2000, 32, IND)]);
    assert_eq!(q.run(), vec![(u32::from(h), 513)]);
    assert_eq!(d.byte(STATUS), OK);
    q.assert_serving();
}

#[test]
fn queue_descriptor_loop() {
    let d = device();
    let mut q = Rig::new(&d);
    // A writable descriptor that points at itself: the queue stops after 256 descriptors;
    // 255 * 512 - 1 bytes of data is not a sector multiple: IOERR at the last writable byte.
    d.hdr_at(HDR, VIRTIO_BLK_T_IN, 0);
    let head = q.alloc(2);
    q.store(head[0], HDR, 16, NEXT, head[1]);
    q.store(head[1], DATA2, 512, WO | NEXT, head[1]);
    q.publish(head[0]);
    d.put(DATA2 + 511, &[SENTINEL]);
    assert_eq!(q.run(), vec![(u32::from(head[0]), 1)]);
    assert_eq!(d.byte(DATA2 + 511), IOERR);
    q.assert_serving();
    // A two-descriptor loop back to the readable header: a readable after a writable.
    let head = q.alloc(2);
    q.store(head[0], HDR, 16, NEXT, head[1]);
    q.store(head[1], DATA2, 512, WO | NEXT, head[0]);
    q.publish(head[0]);
    d.put(DATA2 + 511, &[SENTINEL]);
    assert_eq!(q.run(), vec![(u32::from(head[0]), 1)]);
    assert_eq!(d.byte(DATA2 + 511), IOERR);
    q.assert_serving();
    // A loop of readable descriptors (an OUT with no status): dropped, the disk untouched.
    let before = d.file_bytes();
    d.hdr_at(HDR, VIRTIO_BLK_T_OUT, 0);
    let head = q.alloc(2);
    q.store(head[0], HDR, 16, NEXT, head[1]);
    q.store(head[1], DATA, 512, NEXT, head[0]);
    q.publish(head[0]);
    assert_eq!(q.run(), vec![(u32::from(head[0]), 0)]);
    assert_eq!(d.file_bytes(), before);
    q.assert_serving();
}

#[test]
fn queue_loop_inside_an_indirect_table() {
    let d = device();
    let mut q = Rig::new(&d);
    d.hdr_at(HDR, VIRTIO_BLK_T_IN, 0);
    // Entry 1 points at itself; the table has 16 entries, so 1 + 15 descriptors come out.
    let table = [(HDR, 16u32, NEXT, 1u16), (DATA2, 4096, WO | NEXT, 1)];
    for (k, &(addr, len, flags, next)) in table.iter().enumerate() {
        write_desc(&d.mem, INDIRECT + 16 * k as u64, (addr, len, flags, next));
    }
    let head = q.alloc(1)[0];
    q.store(head, INDIRECT, 16 * 16, IND, 0);
    q.publish(head);
    d.put(DATA2 + 4095, &[SENTINEL]);
    assert_eq!(q.run(), vec![(u32::from(head), 1)]);
    assert_eq!(d.byte(DATA2 + 4095), IOERR);
    q.assert_serving();
}

#[test]
fn queue_bad_indirect_tables() {
    let d = device();
    let mut q = Rig::new(&d);
    d.hdr_at(HDR, VIRTIO_BLK_T_IN, 0);
    write_desc(&d.mem, INDIRECT, (HDR, 16, NEXT, 1));
    write_desc(&d.mem, INDIRECT + 16, (STATUS, 1, WO, 0));
    // A nested indirect table.
    write_desc(&d.mem, INDIRECT + 0x400, (INDIRECT, 32, IND, 0));
    for (table, len) in [
        (INDIRECT, 40u32),      // not a multiple of 16
        (INDIRECT, 0),          // empty
        (MEM_SIZE, 32),         // outside guest memory
        (u64::MAX - 15, 32),    // at the end of the address space
        (INDIRECT, 16 * 65536), // more entries than a queue may have
        (INDIRECT + 0x400, 16), // nested
    ] {
        d.put(STATUS, &[SENTINEL]);
        let head = q.alloc(1)[0];
        q.store(head, table, len, IND, 0);
        q.publish(head);
        assert_eq!(
            q.run(),
            vec![(u32::from(head), 0)],
            "table {table:#x}+{len}"
        );
        assert_eq!(d.byte(STATUS), SENTINEL);
        q.assert_serving();
    }
    // The well-formed table itself works.
    d.put(STATUS, &[SENTINEL]);
    let head = q.alloc(1)[0];
    q.store(head, INDIRECT, 32, IND, 0);
    q.publish(head);
    assert_eq!(q.run(), vec![(u32::from(head), 1)]);
    assert_eq!(d.byte(STATUS), OK);
}

#[test]
fn queue_bad_indices() {
    let d = device();
    let mut q = Rig::new(&d);
    // A NEXT index beyond the table: the chain ends there (no status: dropped).
    d.hdr_at(HDR, VIRTIO_BLK_T_IN, 0);
    let head = q.alloc(1)[0];
    q.store(head, HDR, 16, NEXT, 999);
    q.publish(head);
    assert_eq!(q.run(), vec![(u32::from(head), 0)]);
    q.assert_serving();
    // A head index beyond the table: nothing can be used for it, and the queue keeps going.
    q.publish(QUEUE_SIZE + 44);
    q.publish(u16::MAX);
    d.hdr_at(HDR, VIRTIO_BLK_T_GET_ID, 0);
    d.put(STATUS, &[SENTINEL]);
    let head = q.chain(&[(HDR, 16, RO), (DATA, 20, WO), (STATUS, 1, WO)]);
    assert_eq!(q.run(), vec![(u32::from(head), 21)]);
    assert_eq!(d.byte(STATUS), OK);
    q.assert_serving();
    // An available index that runs more than a queue ahead: nothing is processed, and the
    // queue stays stopped (the ring is broken) even once the index is back, until the VMM sets
    // the ring up again.
    let idx = q.ring.avail_idx();
    q.ring.set_avail_idx(idx.wrapping_add(QUEUE_SIZE + 1));
    assert_eq!(q.run(), vec![]);
    assert!(q.vring.lock().broken().is_some());
    q.ring.set_avail_idx(idx);
    assert_eq!(q.run(), vec![]);
    q.reinit();
    q.assert_serving();
}

#[test]
fn queue_chain_longer_than_4_gib() {
    let d = device();
    let mut q = Rig::new(&d);
    // The queue cuts the chain at the descriptor that takes it past 4 GiB: what is left is a
    // read into 2 GiB outside guest memory whose "status" is outside memory too.
    d.hdr_at(HDR, VIRTIO_BLK_T_IN, 0);
    d.put(STATUS, &[SENTINEL]);
    let head = q.chain(&[
        (HDR, 16, RO),
        (DATA, 0x8000_0000, WO),
        (DATA, 0x8000_0000, WO),
        (STATUS, 1, WO),
    ]);
    assert_eq!(q.run(), vec![(u32::from(head), 0)]);
    assert_eq!(d.byte(STATUS), SENTINEL);
    q.assert_serving();
    // 256 descriptors of 16 MiB over the same memory (in an indirect table, as they do not fit
    // the queue): cut before the one that reaches 4 GiB. 255 * 16 MiB - 1 bytes of data are
    // not a sector multiple: IOERR in the last byte of memory, and nothing read.
    let mut descs = vec![(HDR, 16, RO)];
    descs.extend(std::iter::repeat_n((0, MEM_SIZE as u32, WO), 256));
    descs.push((STATUS, 1, WO));
    let head = q.indirect(INDIRECT, &descs);
    assert_eq!(q.run(), vec![(u32::from(head), 1)]);
    assert_eq!(d.byte(MEM_SIZE - 1), IOERR);
    q.assert_serving();
}

#[test]
fn queue_mixed_batch_with_event_idx() {
    let d = device();
    let mut q = Rig::new(&d);
    q.vring.lock().ring.event_idx = true;
    let before = d.disk(0, 4096);
    // Valid write, no status, unknown type, readable-after-writable, valid read, GET_ID,
    // bad discard, flush: one kick.
    d.hdr_at(HDR, VIRTIO_BLK_T_OUT, 1000);
    d.put(DATA, &pattern(1000, 1024));
    d.hdr_at(HDR + 16, VIRTIO_BLK_T_OUT, 0);
    d.hdr_at(HDR + 32, 3, 0);
    d.hdr_at(HDR + 48, VIRTIO_BLK_T_IN, 0);
    d.hdr_at(HDR + 64, VIRTIO_BLK_T_IN, 1000);
    d.hdr_at(HDR + 80, VIRTIO_BLK_T_GET_ID, 0);
    d.hdr_at(HDR + 96, VIRTIO_BLK_T_DISCARD, 0);
    d.hdr_at(HDR + 112, VIRTIO_BLK_T_FLUSH, 0);
    for i in 0..8 {
        d.put(STATUS + i, &[SENTINEL]);
    }
    let heads = [
        q.chain(&[(HDR, 16, RO), (DATA, 1024, RO), (STATUS, 1, WO)]),
        q.chain(&[(HDR + 16, 16, RO), (DATA + 8192, 4096, RO)]),
        q.chain(&[(HDR + 32, 16, RO), (STATUS + 2, 1, WO)]),
        q.chain(&[
            (HDR + 48, 16, RO),
            (DATA2 + 8192, 512, WO),
            (DATA, 16, RO),
            (STATUS + 3, 1, WO),
        ]),
        q.chain(&[(HDR + 64, 16, RO), (DATA2, 1024, WO), (STATUS + 4, 1, WO)]),
        q.chain(&[
            (HDR + 80, 16, RO),
            (DATA2 + 4096, 20, WO),
            (STATUS + 5, 1, WO),
        ]),
        q.chain(&[(HDR + 96, 16 + 7, RO), (STATUS + 6, 1, WO)]),
        q.chain(&[(HDR + 112, 16, RO), (STATUS + 7, 1, WO)]),
    ];
    let used = q.run();
    let lens = [1, 0, 1, 1, 1025, 21, 1, 1];
    let expect: Vec<(u32, u32)> = heads.iter().map(|&h| u32::from(h)).zip(lens).collect();
    assert_eq!(used, expect);
    assert_eq!(
        d.get(STATUS, 8),
        vec![OK, SENTINEL, UNSUPP, SENTINEL, OK, OK, IOERR, OK]
    );
    assert_eq!(d.byte(DATA2 + 8192 + 511), IOERR);
    assert_eq!(d.get(DATA2, 1024), pattern(1000, 1024));
    assert_eq!(d.get(DATA2 + 4096, SERIAL.len()), SERIAL.as_bytes());
    assert_eq!(d.disk(0, 4096), before);
    q.assert_serving();
}

#[test]
fn queue_many_segments_and_tiny_descriptors() {
    let d = device();
    let mut q = Rig::new(&d);
    // About 260 tiny descriptors of 1 to 7 bytes (> seg_max 128) carrying 1 KiB.
    let data = pattern(0xBEEF, 1024);
    let mut descs = vec![(HDR, 16u32, RO)];
    let mut at = DATA;
    let mut off = 0;
    while off < data.len() {
        let n = (1 + descs.len() % 7).min(data.len() - off);
        d.put(at, &data[off..off + n]);
        descs.push((at, n as u32, RO));
        at += 16;
        off += n;
    }
    assert!(descs.len() > QUEUE_SIZE as usize);
    // More descriptors than a 256-entry queue holds: use an indirect table.
    descs.push((STATUS, 1, WO));
    d.hdr_at(HDR, VIRTIO_BLK_T_OUT, 77);
    d.put(STATUS, &[SENTINEL]);
    let head = q.indirect(INDIRECT, &descs);
    assert_eq!(q.run(), vec![(u32::from(head), 1)]);
    assert_eq!(d.byte(STATUS), OK);
    assert_eq!(d.disk(77 * 512, 1024), data);
    // Read back over 200 direct descriptors of odd sizes.
    let pieces = tiny_pieces(DATA2, 1024, 2);
    let mut descs = vec![(HDR + 16, 16u32, RO)];
    descs.extend(pieces.iter().map(|&(a, n)| (a, n as u32, WO)));
    descs.push((STATUS, 1, WO));
    assert!(descs.len() > 128 && descs.len() <= QUEUE_SIZE as usize);
    d.hdr_at(HDR + 16, VIRTIO_BLK_T_IN, 77);
    let head = q.chain(&descs);
    assert_eq!(q.run(), vec![(u32::from(head), 1025)]);
    let mut got = Vec::new();
    for &(a, n) in &pieces {
        got.extend(d.get(a, n));
    }
    assert_eq!(got, data);
    q.assert_serving();
}

#[test]
fn stop_waits_for_every_request_taken_and_a_new_ring_gets_no_old_head() {
    // 40 reads of 1 MiB: large enough to be shared with the helper thread.
    let d = device();
    let mut q = Rig::new(&d);
    const N: u64 = 40;
    for i in 0..N {
        d.hdr_at(HDR + 16 * i, VIRTIO_BLK_T_IN, 0);
        d.put(STATUS + i, &[SENTINEL]);
        q.chain(&[
            (HDR + 16 * i, 16, RO),
            (DATA2, MIB as u32, WO),
            (STATUS + i, 1, WO),
        ]);
    }
    let stopped_at = std::thread::scope(|s| {
        let worker = s.spawn(|| d.dev.process_queue(&q.vring));
        // GET_VRING_BASE as soon as the queue has taken something.
        while q.vring.lock().ring.next_avail() == 0 {
            std::thread::yield_now();
        }
        let next = q.vring.stop(false);
        assert_eq!(
            q.ring.used_idx(),
            next,
            "the stop returned while requests it had taken were still running"
        );
        worker.join().unwrap();
        next
    });
    assert_eq!(
        q.ring.used_idx(),
        stopped_at,
        "the ring was touched after the stop"
    );
    for i in 0..N {
        let want = if i < u64::from(stopped_at) {
            OK
        } else {
            SENTINEL
        };
        assert_eq!(
            d.byte(STATUS + i),
            want,
            "request {i} (stopped at {stopped_at})"
        );
    }
    // A guest reset: the ring is set up again elsewhere, from index 0. Only the new request
    // comes out of it.
    let fresh = SplitRing::new(&d.mem, 0x40000, QUEUE_SIZE);
    Rig::setup(&q.vring, &fresh, &d.mem);
    d.hdr_at(HDR, VIRTIO_BLK_T_GET_ID, 0);
    d.put(STATUS, &[SENTINEL]);
    for (i, (addr, len, flags, next)) in [
        (HDR, 16u32, NEXT, 1u16),
        (DATA, 20, WO | NEXT, 2),
        (STATUS, 1, WO, 0),
    ]
    .into_iter()
    .enumerate()
    {
        fresh.store_desc(i as u16, addr, len, flags, next);
    }
    fresh.set_avail_entry(0, 0);
    fresh.set_avail_idx(1);
    d.dev.process_queue(&q.vring);
    assert_eq!(fresh.used_idx(), 1);
    assert_eq!(fresh.used_entry(0), (0, 21));
    assert_eq!(d.byte(STATUS), OK);
    assert_eq!(q.ring.used_idx(), stopped_at);
}

/// Found by the queue_requests fuzzer: a ring whose areas end past the top of the address
/// space (as a VMM may set it up; nothing has checked it yet when a call fd arrives or a
/// notification is decided) made the device compute a field's address with an overflowing
/// add: a panic with overflow checks, else a read or write of whatever guest memory the
/// wrapped address hit. Every field access is an error instead.
#[test]
fn ring_fields_past_the_end_of_the_address_space() {
    use vhost_user_vhdx::ring::SplitRing as DeviceRing;
    let mem = guest_memory();
    for event_idx in [false, true] {
        let mut ring = DeviceRing::new(QUEUE_SIZE);
        ring.event_idx = event_idx;
        ring.desc = GuestAddress(0);
        // 4 + 2 * size past these, the used_event and avail_event fields wrap round to low
        // addresses, which are guest memory here.
        ring.avail = GuestAddress(u64::MAX - 1);
        ring.used = GuestAddress(u64::MAX - 3);
        assert!(ring.check(&mem).is_err());
        assert!(ring.avail_idx(&mem).is_err());
        assert!(ring.used_idx(&mem).is_err());
        assert!(ring.pop(&mem).is_err());
        assert!(ring.add_used(&mem, 0, 0).is_err());
        assert!(ring.needs_notification(&mem).is_err());
        assert!(ring.enable_notification(&mem).is_err());
        // With EVENT_IDX, disabling notifications writes nothing.
        assert_eq!(ring.disable_notification(&mem).is_err(), !event_idx);
    }
}

/// A used ring whose entries are guest memory but whose index is not (it starts 4 bytes before
/// the only region): adding an entry fails, and the device's used count does not move past
/// what the driver was told.
#[test]
fn a_used_index_outside_memory_leaves_the_used_count_alone() {
    use vhost_user_vhdx::ring::SplitRing as DeviceRing;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10000), 0x10000)]).unwrap();
    let mut ring = DeviceRing::new(QUEUE_SIZE);
    ring.desc = GuestAddress(0x10000);
    ring.avail = GuestAddress(0x11000);
    ring.used = GuestAddress(0x10000 - 4);
    for _ in 0..2 {
        assert!(ring.add_used(&mem, 0, 0).is_err());
        assert_eq!(ring.next_used(), 0);
    }
}
