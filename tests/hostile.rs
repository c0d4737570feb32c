//! Damaged and hostile VHDX files are refused with a precise error: never a panic, never a hang,
//! never a huge allocation.
//!
//! Each named case builds a valid file (with our `create`, with `qemu-img create -f vhdx`, or from
//! a Windows-made fixture), damages exactly one thing with raw byte edits (re-stamping the
//! CRC-32C of headers, region tables and log entries where the case is about content rather than
//! the checksum), and asserts the exact error variant, its key fields and that its message names
//! the structure. `mutation_smoke` then throws thousands of seeded random mutations at a few valid
//! files and checks that every open, read and `check` returns instead of panicking or hanging,
//! and that a log replayed in memory (read-only) and into the file (writable) give the same disk.
//!
//! A counting global allocator records the largest single allocation made on each thread, so the
//! cases can assert that a hostile size field never turns into a huge allocation.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;
use vhost_user_vhdx::vhdx::chain::MAX_CHAIN_DEPTH;
use vhost_user_vhdx::vhdx::check::{check, Repair};
use vhost_user_vhdx::vhdx::create::{create, CreateOptions, Subformat};
use vhost_user_vhdx::vhdx::format::{
    BAT_REGION_GUID, FILE_PARAMETERS_GUID, LOGICAL_SECTOR_SIZE_GUID, METADATA_REGION_GUID,
    PARENT_LOCATOR_GUID, VHDX_LOCATOR_TYPE_GUID, VIRTUAL_DISK_ID_GUID, VIRTUAL_DISK_SIZE_GUID,
};
use vhost_user_vhdx::vhdx::header::read_headers;
use vhost_user_vhdx::vhdx::locator::{format_guid_string, ParentLocator, KEY_RELATIVE_PATH};
use vhost_user_vhdx::vhdx::log::entry::build_entry;
use vhost_user_vhdx::vhdx::log::LogOp;
use vhost_user_vhdx::vhdx::{
    Chain, ChainError, ChainOptions, Corruption, Error, LogState, MemStorage, Source, Storage,
    VhdxFile,
};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

// ---------------------------------------------------------------------------------------------
// The largest single allocation per thread.

struct CountingAlloc;

thread_local! {
    static PEAK_ALLOC: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = PEAK_ALLOC.try_with(|p| {
        if size > p.get() {
            p.set(size)
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the wrapper only records
// sizes in a thread-local `Cell` that needs no allocation.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_alloc(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    PEAK_ALLOC.with(|p| p.set(0));
    let r = f();
    (r, PEAK_ALLOC.with(|p| p.get()))
}

/// No open of the small files in these cases needs more than this in one allocation.
const ALLOC_LIMIT: usize = 16 * MIB as usize;

#[track_caller]
fn open(path: &Path) -> vhost_user_vhdx::vhdx::Result<VhdxFile> {
    let (r, peak) = peak_alloc(|| VhdxFile::open(path, false));
    assert!(
        peak <= ALLOC_LIMIT,
        "opening {} allocated {peak} bytes at once",
        path.display()
    );
    r
}

#[track_caller]
fn open_chain(path: &Path, options: &ChainOptions) -> vhost_user_vhdx::vhdx::Result<Chain> {
    let (r, peak) = peak_alloc(|| Chain::open(path, options));
    assert!(
        peak <= ALLOC_LIMIT,
        "opening the chain of {} allocated {peak} bytes at once",
        path.display()
    );
    r
}

// ---------------------------------------------------------------------------------------------
// Asserting precise errors.

/// Asserts that `r` is exactly the corruption `expected` and that its message contains every
/// string of `names`; returns the message.
#[track_caller]
fn expect_corruption<T>(
    r: vhost_user_vhdx::vhdx::Result<T>,
    expected: Corruption,
    names: &[&str],
) -> String {
    let e = match r {
        Ok(_) => panic!("expected {expected:?}, but the file opened"),
        Err(e) => e,
    };
    let msg = e.to_string();
    match e {
        Error::Corrupt(c) => assert_eq!(c, expected, "message: {msg}"),
        other => panic!("expected {expected:?}, got {other:?} ({msg})"),
    }
    assert!(msg.starts_with("corrupt VHDX: "), "{msg}");
    for n in names {
        assert!(msg.contains(n), "message {msg:?} does not mention {n:?}");
    }
    msg
}

/// Asserts that `r` is `Error::Unsupported` whose message contains every string of `names`.
#[track_caller]
fn expect_unsupported<T>(r: vhost_user_vhdx::vhdx::Result<T>, names: &[&str]) -> String {
    let msg = match r {
        Ok(_) => panic!("expected Unsupported, but the file opened"),
        Err(Error::Unsupported(m)) => m,
        Err(other) => panic!("expected Unsupported, got {other:?} ({other})"),
    };
    for n in names {
        assert!(msg.contains(n), "message {msg:?} does not mention {n:?}");
    }
    msg
}

/// The chain error behind `r`, with its message.
#[track_caller]
fn expect_chain_error<T>(r: vhost_user_vhdx::vhdx::Result<T>) -> (ChainError, String) {
    match r {
        Ok(_) => panic!("expected a chain error, but the chain opened"),
        Err(Error::Chain(c)) => {
            let msg = c.to_string();
            (c, msg)
        }
        Err(other) => panic!("expected a chain error, got {other:?} ({other})"),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw byte edits.

/// CRC-32C of `buf` with the 4 bytes at `at` taken as zero.
fn crc_with_field_zeroed(buf: &[u8], at: usize) -> u32 {
    let mut copy = buf.to_vec();
    copy[at..at + 4].fill(0);
    crc32c::crc32c(&copy)
}

/// Writes the CRC-32C of `buf` (checksum field at `at`, taken as zero) into that field.
fn stamp_crc(buf: &mut [u8], at: usize) {
    let crc = crc_with_field_zeroed(buf, at);
    buf[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

const HEADER_OFFSETS: [u64; 2] = [0x10000, 0x20000];
const REGION_TABLE_OFFSETS: [u64; 2] = [0x30000, 0x40000];
const HEADER_LEN: u64 = 4096;
const REGION_TABLE_LEN: u64 = 64 * KIB;
// Header fields (§1.3 of the notes).
const H_SEQUENCE: u64 = 8;
const H_DATA_WRITE_GUID: u64 = 32;
const H_LOG_GUID: u64 = 48;
const H_LOG_VERSION: u64 = 64;
const H_VERSION: u64 = 66;
const H_LOG_LENGTH: u64 = 68;
const H_LOG_OFFSET: u64 = 72;
// Payload block states.
const FULLY_PRESENT: u64 = 6;
const PARTIALLY_PRESENT: u64 = 7;
const SB_PRESENT: u64 = 6;

/// With `VHDX_HOSTILE_DUMP=<dir>`, every damaged file a case saves is also copied there, named
/// after the case, for the fuzzer's seed corpus (`fuzz/seeds/hostile/`, see fuzz/README.md).
/// Off in ordinary runs.
fn dump_for_fuzzing(bytes: &[u8]) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static SAVED: AtomicUsize = AtomicUsize::new(0);
    let Some(dir) = std::env::var_os("VHDX_HOSTILE_DUMP") else {
        return;
    };
    let case = std::thread::current()
        .name()
        .unwrap_or("case")
        .rsplit("::")
        .next()
        .unwrap_or("case")
        .to_string();
    let n = SAVED.fetch_add(1, Ordering::Relaxed);
    let path = Path::new(&dir).join(format!("{case}-{n}.vhdx"));
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A whole VHDX file in memory, edited field by field and written back.
#[derive(Clone)]
struct Raw {
    path: PathBuf,
    b: Vec<u8>,
}

impl Raw {
    fn load(path: &Path) -> Raw {
        let b = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Raw {
            path: path.to_path_buf(),
            b,
        }
    }

    fn save(&self) {
        std::fs::write(&self.path, &self.b)
            .unwrap_or_else(|e| panic!("write {}: {e}", self.path.display()));
        dump_for_fuzzing(&self.b);
    }

    fn len(&self) -> u64 {
        self.b.len() as u64
    }

    fn bytes(&self, off: u64, len: u64) -> &[u8] {
        &self.b[off as usize..(off + len) as usize]
    }

    fn put(&mut self, off: u64, bytes: &[u8]) {
        let end = off as usize + bytes.len();
        if self.b.len() < end {
            self.b.resize(end, 0);
        }
        self.b[off as usize..end].copy_from_slice(bytes);
    }

    fn u16(&self, off: u64) -> u16 {
        u16::from_le_bytes(self.bytes(off, 2).try_into().unwrap())
    }
    fn u32(&self, off: u64) -> u32 {
        u32::from_le_bytes(self.bytes(off, 4).try_into().unwrap())
    }
    fn u64(&self, off: u64) -> u64 {
        u64::from_le_bytes(self.bytes(off, 8).try_into().unwrap())
    }
    fn guid(&self, off: u64) -> Uuid {
        Uuid::from_bytes_le(self.bytes(off, 16).try_into().unwrap())
    }
    fn put_u16(&mut self, off: u64, v: u16) {
        self.put(off, &v.to_le_bytes())
    }
    fn put_u32(&mut self, off: u64, v: u32) {
        self.put(off, &v.to_le_bytes())
    }
    fn put_u64(&mut self, off: u64, v: u64) {
        self.put(off, &v.to_le_bytes())
    }
    fn put_guid(&mut self, off: u64, g: Uuid) {
        self.put(off, &g.to_bytes_le())
    }

    fn restamp(&mut self, off: u64, len: u64) {
        stamp_crc(&mut self.b[off as usize..(off + len) as usize], 4);
    }

    // Headers.

    /// The slot (0 or 1) with the greater sequence number; both headers must be valid.
    fn current_slot(&self) -> usize {
        let seq = |s: usize| self.u64(HEADER_OFFSETS[s] + H_SEQUENCE);
        usize::from(seq(1) > seq(0))
    }

    fn header_field(&self, slot: usize, field: u64) -> u64 {
        HEADER_OFFSETS[slot] + field
    }

    fn restamp_header(&mut self, slot: usize) {
        self.restamp(HEADER_OFFSETS[slot], HEADER_LEN);
    }

    /// Edits a field of both headers and re-stamps them.
    fn edit_headers(&mut self, field: u64, bytes: &[u8]) {
        for (slot, offset) in HEADER_OFFSETS.into_iter().enumerate() {
            self.put(offset + field, bytes);
            self.restamp_header(slot);
        }
    }

    fn data_write_guid(&self) -> Uuid {
        self.guid(self.header_field(self.current_slot(), H_DATA_WRITE_GUID))
    }

    fn log(&self) -> (u64, u64) {
        let s = self.current_slot();
        (
            self.u64(self.header_field(s, H_LOG_OFFSET)),
            u64::from(self.u32(self.header_field(s, H_LOG_LENGTH))),
        )
    }

    // Region tables (entries: GUID, FileOffset u64, Length u32, Required u32).

    fn region_count(&self) -> u32 {
        self.u32(REGION_TABLE_OFFSETS[0] + 8)
    }

    fn region_entry(&self, index: u32) -> u64 {
        REGION_TABLE_OFFSETS[0] + 16 + 32 * u64::from(index)
    }

    fn region_index(&self, guid: Uuid) -> u32 {
        (0..self.region_count())
            .find(|&i| self.guid(self.region_entry(i)) == guid)
            .unwrap_or_else(|| panic!("region {guid} not in the table"))
    }

    fn region(&self, guid: Uuid) -> (u64, u64) {
        let e = self.region_entry(self.region_index(guid));
        (self.u64(e + 16), u64::from(self.u32(e + 24)))
    }

    /// Copies region table 1 over table 2 and re-stamps both.
    fn sync_region_tables(&mut self) {
        self.restamp(REGION_TABLE_OFFSETS[0], REGION_TABLE_LEN);
        let t = self
            .bytes(REGION_TABLE_OFFSETS[0], REGION_TABLE_LEN)
            .to_vec();
        self.put(REGION_TABLE_OFFSETS[1], &t);
    }

    fn set_region(&mut self, guid: Uuid, offset: u64, length: u64) {
        let e = self.region_entry(self.region_index(guid));
        self.put_u64(e + 16, offset);
        self.put_u32(e + 24, length as u32);
        self.sync_region_tables();
    }

    // Metadata (table entries: ItemId, Offset u32, Length u32, flags u32, reserved u32).

    fn meta(&self) -> u64 {
        self.region(METADATA_REGION_GUID).0
    }

    fn meta_count(&self) -> u16 {
        self.u16(self.meta() + 10)
    }

    fn meta_entry(&self, index: u16) -> u64 {
        self.meta() + 32 + 32 * u64::from(index)
    }

    fn meta_index(&self, guid: Uuid) -> u16 {
        (0..self.meta_count())
            .find(|&i| self.guid(self.meta_entry(i)) == guid)
            .unwrap_or_else(|| panic!("metadata item {guid} not in the table"))
    }

    fn meta_index_opt(&self, guid: Uuid) -> Option<u16> {
        (0..self.meta_count()).find(|&i| self.guid(self.meta_entry(i)) == guid)
    }

    /// (file offset, length) of a metadata item.
    fn item(&self, guid: Uuid) -> (u64, u32) {
        let e = self.meta_entry(self.meta_index(guid));
        (self.meta() + u64::from(self.u32(e + 16)), self.u32(e + 20))
    }

    fn block_size(&self) -> u64 {
        u64::from(self.u32(self.item(FILE_PARAMETERS_GUID).0))
    }

    fn logical_sector_size(&self) -> u64 {
        u64::from(self.u32(self.item(LOGICAL_SECTOR_SIZE_GUID).0))
    }

    fn virtual_size(&self) -> u64 {
        self.u64(self.item(VIRTUAL_DISK_SIZE_GUID).0)
    }

    fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * self.logical_sector_size() / self.block_size()
    }

    /// Adds a metadata item after the last one.
    fn add_item(&mut self, guid: Uuid, flags: u32, data: &[u8]) {
        let count = self.meta_count();
        let end = (0..count)
            .map(|i| {
                let e = self.meta_entry(i);
                self.u32(e + 16) + self.u32(e + 20)
            })
            .max()
            .unwrap();
        let e = self.meta_entry(count);
        self.put_guid(e, guid);
        self.put_u32(e + 16, end);
        self.put_u32(e + 20, data.len() as u32);
        self.put_u32(e + 24, flags);
        let m = self.meta();
        self.put(m + u64::from(end), data);
        self.put_u16(m + 10, count + 1);
    }

    fn set_file_parameter_flags(&mut self, flags: u32) {
        let fp = self.item(FILE_PARAMETERS_GUID).0;
        self.put_u32(fp + 4, flags);
    }

    /// Turns a file into a differencing file with this parent locator.
    fn make_differencing(&mut self, locator: &ParentLocator) {
        let fp = self.item(FILE_PARAMETERS_GUID).0;
        let flags = self.u32(fp + 4);
        self.set_file_parameter_flags(flags | 2);
        self.add_item(PARENT_LOCATOR_GUID, 4, &locator.to_bytes().unwrap());
    }

    // BAT.

    fn bat(&self) -> u64 {
        self.region(BAT_REGION_GUID).0
    }

    fn bat_entry(&self, index: u64) -> u64 {
        self.u64(self.bat() + 8 * index)
    }

    fn set_bat(&mut self, index: u64, value: u64) {
        let at = self.bat() + 8 * index;
        self.put_u64(at, value);
    }

    fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio()
    }

    /// Appends a block of `len` bytes filled with `fill` at the next 1 MiB boundary; returns its
    /// offset.
    fn append(&mut self, len: u64, fill: u8) -> u64 {
        let at = self.len().div_ceil(MIB) * MIB;
        self.b.resize(at as usize, 0);
        self.b.resize((at + len) as usize, fill);
        at
    }

    /// Allocates payload block `block` as FULLY_PRESENT, filled with `fill`.
    fn allocate(&mut self, block: u64, fill: u8) -> u64 {
        let at = self.append(self.block_size(), fill);
        self.set_bat(self.payload_index(block), at | FULLY_PRESENT);
        at
    }

    /// Payload entries that are FULLY_PRESENT: (BAT index, entry).
    fn present_entries(&self) -> Vec<(u64, u64)> {
        let count = self.virtual_size().div_ceil(self.block_size());
        (0..count)
            .map(|b| self.payload_index(b))
            .map(|i| (i, self.bat_entry(i)))
            .filter(|(_, e)| e & 7 == FULLY_PRESENT)
            .collect()
    }

    /// Writes a log entry at `position` of the log and sets LogGuid in both headers.
    fn put_log_entry(&mut self, position: u64, entry: &[u8], log_guid: Uuid) {
        let (log_offset, _) = self.log();
        self.put(log_offset + position, entry);
        self.edit_headers(H_LOG_GUID, &log_guid.to_bytes_le());
    }
}

// ---------------------------------------------------------------------------------------------
// Valid files to start from.

fn new_file(dir: &Path, name: &str, opts: CreateOptions) -> PathBuf {
    let path = dir.join(name);
    create(&path, &opts).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    VhdxFile::open(&path, false).unwrap_or_else(|e| panic!("fresh {name} must open: {e}"));
    path
}

/// Ours, dynamic: 64 MiB, 32 MiB blocks (Hyper-V's default), 512-byte sectors.
fn ours_dynamic(dir: &Path) -> PathBuf {
    new_file(
        dir,
        "dynamic.vhdx",
        CreateOptions {
            virtual_size: Some(64 * MIB),
            ..Default::default()
        },
    )
}

/// Ours, fixed: 8 MiB in 2 MiB blocks, 4096-byte sectors.
fn ours_fixed_4k(dir: &Path) -> PathBuf {
    new_file(
        dir,
        "fixed4k.vhdx",
        CreateOptions {
            virtual_size: Some(8 * MIB),
            block_size: Some(2 * MIB as u32),
            logical_sector_size: Some(4096),
            subformat: Subformat::Fixed,
            ..Default::default()
        },
    )
}

/// Ours: a dynamic parent `base/parent.vhdx` (8 MiB, 1 MiB blocks) and its differencing child
/// `child.vhdx`.
fn ours_chain(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir.join("base")).unwrap();
    let parent = new_file(
        &dir.join("base"),
        "parent.vhdx",
        CreateOptions {
            virtual_size: Some(8 * MIB),
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    );
    let child = new_file(
        dir,
        "child.vhdx",
        CreateOptions {
            parent: Some(parent.clone()),
            ..Default::default()
        },
    );
    Chain::open(&child, &ChainOptions::default()).expect("fresh chain opens");
    (parent, child)
}

/// `qemu-img create -f vhdx` (dynamic, 8 MiB blocks, log at 1 MiB, BAT at 2 MiB, metadata at
/// 3 MiB).
fn qemu_dynamic(dir: &Path, size: &str) -> PathBuf {
    let path = dir.join("qemu.vhdx");
    common::qemu_img_create_vhdx(&path, size, "");
    VhdxFile::open(&path, false).expect("qemu-made file opens");
    path
}

fn dir() -> tempfile::TempDir {
    common::tempdir("hostile-")
}

// ---------------------------------------------------------------------------------------------
// File identifier and headers.

#[test]
fn file_shorter_than_the_header_section() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(MIB - 512).unwrap();
    expect_corruption(
        open(&p),
        Corruption::FileTooSmall { size: MIB - 512 },
        &["1 MiB", "header section"],
    );
    f.set_len(0).unwrap();
    expect_corruption(open(&p), Corruption::FileTooSmall { size: 0 }, &["0 bytes"]);
}

#[test]
fn bad_file_signature() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    r.put(0, b"vhdxfilE");
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BadFileSignature,
        &["vhdxfile", "offset 0"],
    );
}

#[test]
fn both_headers_corrupt() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    // Header 1: one reserved byte changed, so only its checksum is wrong.
    r.put(HEADER_OFFSETS[0] + 1000, &[1]);
    // Header 2: signature gone.
    r.put(HEADER_OFFSETS[1], b"HEAD");
    r.save();
    expect_corruption(
        open(&p),
        Corruption::NoValidHeader {
            first: "bad checksum".into(),
            second: "bad signature".into(),
        },
        &["header 1 at 0x10000", "header 2 at 0x20000"],
    );
}

#[test]
fn one_corrupt_header_falls_back_to_the_other() {
    // Ours: header 2 (sequence 2) is current; damage it and header 1 takes over.
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    assert_eq!(r.current_slot(), 1);
    r.put(HEADER_OFFSETS[1] + 200, &[0xff]);
    r.save();
    let f = open(&p).expect("header 1 is still valid");
    assert_eq!(f.headers.current_slot, 0);
    assert_eq!(f.headers.current.sequence_number, 1);

    // Windows: damage the non-current header's checksum field itself.
    let (_fx, p) = common::fixture("discutils-btrfs");
    let mut r = Raw::load(&p);
    let current = r.current_slot();
    let other = 1 - current;
    let crc = r.u32(HEADER_OFFSETS[other] + 4);
    r.put_u32(HEADER_OFFSETS[other] + 4, crc ^ 1);
    r.save();
    let f = open(&p).expect("the current header is intact");
    assert_eq!(f.headers.current_slot, current);
}

#[test]
fn equal_sequence_numbers_with_different_content() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    // Header 1 gets header 2's sequence number and another DataWriteGuid.
    let seq2 = r.u64(HEADER_OFFSETS[1] + H_SEQUENCE);
    r.put_u64(HEADER_OFFSETS[0] + H_SEQUENCE, seq2);
    r.put_guid(
        HEADER_OFFSETS[0] + H_DATA_WRITE_GUID,
        Uuid::from_u128(0xd1ff),
    );
    r.restamp_header(0);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::HeaderSequenceTie { sequence: seq2 },
        &["both headers", "same sequence number 2"],
    );
}

#[test]
fn equal_sequence_numbers_with_identical_content_are_accepted() {
    // Disk2VHD writes two byte-identical headers; that is the one tie we accept.
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let h2 = r.bytes(HEADER_OFFSETS[1], HEADER_LEN).to_vec();
    r.put(HEADER_OFFSETS[0], &h2);
    r.save();
    let f = open(&p).unwrap();
    assert_eq!(f.headers.current.sequence_number, 2);
}

#[test]
fn header_version_other_than_1() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    r.edit_headers(H_VERSION, &2u16.to_le_bytes());
    r.save();
    expect_unsupported(open(&p), &["header at 0x20000", "version 2"]);
}

#[test]
fn header_sequence_overflow_on_a_writable_open_of_a_dirty_file() {
    // The Windows fixture has a log to replay: a writable open must update the headers first,
    // which cannot go past u64::MAX.
    let (_fx, p) = common::fixture("discutils-vhdx-log-replay");
    let mut r = Raw::load(&p);
    let slot = r.current_slot();
    r.put_u64(HEADER_OFFSETS[slot] + H_SEQUENCE, u64::MAX);
    r.restamp_header(slot);
    r.save();
    let before = std::fs::read(&p).unwrap();
    expect_corruption(
        VhdxFile::open(&p, true),
        Corruption::HeaderSequenceOverflow(u64::MAX),
        &["header sequence number 0xffffffffffffffff"],
    );
    assert!(
        std::fs::read(&p).unwrap() == before,
        "a refused open must not change the file"
    );
    // Read-only, the log is replayed in memory and nothing needs a new sequence number.
    let f = open(&p).unwrap();
    assert!(matches!(f.log_state, LogState::ReplayedInMemory { .. }));
    // A reader does not share write access (QEMU's locking): close it before writing.
    drop(f);

    // One below the limit: the first of the two header updates fits, the second does not.
    r.put_u64(HEADER_OFFSETS[slot] + H_SEQUENCE, u64::MAX - 1);
    r.restamp_header(slot);
    r.save();
    expect_corruption(
        VhdxFile::open(&p, true),
        Corruption::HeaderSequenceOverflow(u64::MAX),
        &["cannot be incremented"],
    );
    // The file still opens (the log was not touched, only a header was rewritten).
    open(&p).unwrap();
}

#[test]
fn header_sequence_overflow_through_headers_update() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    r.put_u64(HEADER_OFFSETS[1] + H_SEQUENCE, u64::MAX);
    r.restamp_header(1);
    let m = MemStorage::new(r.b.clone());
    let mut hs = read_headers(&m).unwrap();
    assert_eq!(hs.current.sequence_number, u64::MAX);
    let new = hs.current;
    expect_corruption(
        hs.update(&m, new),
        Corruption::HeaderSequenceOverflow(u64::MAX),
        &["header sequence number"],
    );
    assert!(m.snapshot() == r.b, "nothing may be written");
}

#[test]
fn log_version_other_than_0_with_a_log_to_replay() {
    let (_fx, p) = common::fixture("discutils-vhdx-log-replay");
    let mut r = Raw::load(&p);
    r.edit_headers(H_LOG_VERSION, &1u16.to_le_bytes());
    r.save();
    let slot = r.current_slot();
    expect_unsupported(
        open(&p),
        &[
            &format!("header at {:#x}", HEADER_OFFSETS[slot]),
            "log version 1",
        ],
    );

    // Without a log to replay (LogGuid zero) the log version does not matter (MS-VHDX §2.2.2).
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    r.edit_headers(H_LOG_VERSION, &1u16.to_le_bytes());
    r.save();
    open(&p).expect("LogVersion is only checked when there is a log to replay");
}

#[test]
fn log_location_misaligned_in_the_header_section_or_beyond_eof() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let pristine = Raw::load(&p);

    let mut r = pristine.clone();
    r.edit_headers(H_LOG_OFFSET, &(MIB + 4096).to_le_bytes());
    r.save();
    expect_corruption(
        open(&p),
        Corruption::HeaderMisaligned {
            offset: 0x20000,
            field: "LogOffset",
            value: MIB + 4096,
        },
        &["header at 0x20000", "LogOffset"],
    );

    let mut r = pristine.clone();
    r.edit_headers(H_LOG_OFFSET, &0u64.to_le_bytes());
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BadLogLocation {
            offset: 0,
            length: MIB,
        },
        &["log at 0x0", "header section"],
    );

    let mut r = pristine.clone();
    let beyond = r.len().div_ceil(MIB) * MIB;
    r.edit_headers(H_LOG_OFFSET, &beyond.to_le_bytes());
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BeyondEndOfFile {
            what: "the log".into(),
            offset: beyond,
            length: MIB,
            file_size: pristine.len(),
        },
        &["the log at", "beyond the end of the file"],
    );
}

// ---------------------------------------------------------------------------------------------
// Region tables.

#[test]
fn region_table_1_corrupt_but_2_fine() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    r.put(REGION_TABLE_OFFSETS[0] + 5000, &[0x55]);
    r.save();
    let f = open(&p).expect("region table 2 is intact");
    assert_eq!(f.regions.copy, 1);

    // qemu reads only table 1; we also fall back when its signature is gone.
    let p = qemu_dynamic(d.path(), "64M");
    let mut r = Raw::load(&p);
    r.put(REGION_TABLE_OFFSETS[0], b"REGI");
    r.save();
    assert_eq!(open(&p).unwrap().regions.copy, 1);
}

#[test]
fn both_region_tables_corrupt() {
    let d = dir();
    let p = qemu_dynamic(d.path(), "64M");
    let mut r = Raw::load(&p);
    r.put(REGION_TABLE_OFFSETS[0] + 60000, &[1]);
    r.put(REGION_TABLE_OFFSETS[1], b"xegi");
    r.save();
    expect_corruption(
        open(&p),
        Corruption::NoValidRegionTable {
            first: "bad checksum".into(),
            second: "bad signature".into(),
        },
        &[
            "neither region table",
            "table 1 at 0x30000",
            "table 2 at 0x40000",
        ],
    );
}

#[test]
fn region_overlap_bat_and_metadata() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let (bat, _) = r.region(BAT_REGION_GUID);
    r.set_region(METADATA_REGION_GUID, bat, MIB);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::Overlap {
            a: format!("metadata region at {bat:#x}"),
            b: format!("BAT region at {bat:#x}"),
        },
        &["metadata region", "overlaps", "BAT region"],
    );
}

#[test]
fn region_overlapping_the_log() {
    // qemu's layout: log at 1 MiB, BAT at 2 MiB. Stretch the BAT region back over the log.
    let d = dir();
    let p = qemu_dynamic(d.path(), "64M");
    let mut r = Raw::load(&p);
    let (log_offset, _) = r.log();
    r.set_region(BAT_REGION_GUID, log_offset, MIB);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::Overlap {
            a: format!("BAT region at {log_offset:#x}"),
            b: format!("the log at {log_offset:#x}"),
        },
        &["BAT region", "the log"],
    );
}

#[test]
fn region_beyond_end_of_file() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    r.set_region(METADATA_REGION_GUID, GIB, MIB);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BeyondEndOfFile {
            what: "metadata region".into(),
            offset: GIB,
            length: MIB,
            file_size: r.len(),
        },
        &[
            "metadata region at 0x40000000",
            "beyond the end of the file",
        ],
    );
}

#[test]
fn huge_bat_region_is_refused_without_allocating_it() {
    // A region length of almost 4 GiB in a file of a few MiB: refused before anything is read.
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let (bat, _) = r.region(BAT_REGION_GUID);
    let huge = 4 * GIB - MIB;
    r.set_region(BAT_REGION_GUID, bat, huge);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BeyondEndOfFile {
            what: "BAT region".into(),
            offset: bat,
            length: huge,
            file_size: r.len(),
        },
        &["BAT region"],
    );
}

#[test]
fn region_misaligned_or_in_the_header_section() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let pristine = Raw::load(&p);
    for (offset, length) in [
        (2 * MIB + 4096, MIB),
        (0, MIB),
        (4 * MIB, MIB / 2),
        (4 * MIB, 0),
    ] {
        let mut r = pristine.clone();
        r.set_region(METADATA_REGION_GUID, offset, length);
        r.save();
        expect_corruption(
            open(&p),
            Corruption::RegionMisaligned {
                guid: METADATA_REGION_GUID,
                offset,
                length,
            },
            &[
                "region 8b7ca206-4790-4b9a-b8fe-575f050f886e",
                "1 MiB-aligned",
            ],
        );
    }
}

#[test]
fn unknown_required_region() {
    let d = dir();
    let p = qemu_dynamic(d.path(), "64M");
    let mut r = Raw::load(&p);
    let unknown = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
    let e = r.region_entry(2);
    r.put_guid(e, unknown);
    r.put_u64(e + 16, r.len().div_ceil(MIB) * MIB - MIB);
    r.put_u32(e + 24, MIB as u32);
    r.put_u32(e + 28, 1);
    r.put_u32(REGION_TABLE_OFFSETS[0] + 8, 3);
    r.sync_region_tables();
    r.save();
    expect_unsupported(
        open(&p),
        &[
            "region table at 0x30000",
            "unknown required region",
            &unknown.to_string(),
        ],
    );
    // The same region without the Required bit is kept and ignored.
    r.put_u32(e + 28, 0);
    r.sync_region_tables();
    r.save();
    assert_eq!(open(&p).unwrap().regions.regions.len(), 3);
}

#[test]
fn duplicate_region_guid() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let e = r.region_entry(r.region_index(METADATA_REGION_GUID));
    r.put_guid(e, BAT_REGION_GUID);
    r.sync_region_tables();
    r.save();
    expect_corruption(
        open(&p),
        Corruption::DuplicateRegion {
            guid: BAT_REGION_GUID,
        },
        &["region 2dc27766-f623-4200-9d64-115e9bfd4a08 appears more than once"],
    );
}

#[test]
fn missing_metadata_region() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    // Ours lists the BAT first: dropping the count to 1 drops the metadata region.
    assert_eq!(r.region_index(BAT_REGION_GUID), 0);
    r.put_u32(REGION_TABLE_OFFSETS[0] + 8, 1);
    r.sync_region_tables();
    r.save();
    expect_corruption(
        open(&p),
        Corruption::MissingRegion("metadata"),
        &["required region metadata", "missing"],
    );
}

#[test]
fn region_table_with_too_many_entries() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    r.put_u32(REGION_TABLE_OFFSETS[0] + 8, 2048);
    r.sync_region_tables();
    r.save();
    expect_corruption(
        open(&p),
        Corruption::RegionTableTooManyEntries {
            offset: 0x30000,
            count: 2048,
        },
        &["region table at 0x30000", "2048"],
    );
}

// ---------------------------------------------------------------------------------------------
// Metadata.

#[test]
fn bad_metadata_table_signature() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let m = r.meta();
    r.put(m, b"METADATA");
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BadMetadataSignature { offset: m },
        &[&format!("metadata table at {m:#x}"), "signature"],
    );
}

#[test]
fn metadata_table_with_too_many_entries() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let m = r.meta();
    r.put_u16(m + 10, 2048);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::MetadataTooManyEntries {
            offset: m,
            count: 2048,
        },
        &["metadata table", "2048"],
    );
}

/// Sets the file-parameters BlockSize.
fn with_block_size(block_size: u32) {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let fp = r.item(FILE_PARAMETERS_GUID).0;
    r.put_u32(fp, block_size);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BadBlockSize(block_size),
        &[&format!("block size {block_size}"), "power of two"],
    );
}

#[test]
fn block_size_not_a_power_of_two() {
    with_block_size(3 * MIB as u32);
}

#[test]
fn block_size_512_kib() {
    with_block_size(512 * KIB as u32);
}

#[test]
fn block_size_512_mib() {
    with_block_size(512 * MIB as u32);
}

#[test]
fn reserved_file_parameter_bits() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    r.set_file_parameter_flags(0x8);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::FileParameterReservedBits(0x8),
        &["file parameters", "reserved"],
    );
}

#[test]
fn virtual_size_not_a_multiple_of_the_sector_size() {
    let d = dir();
    let p = ours_fixed_4k(d.path());
    let mut r = Raw::load(&p);
    let vds = r.item(VIRTUAL_DISK_SIZE_GUID).0;
    r.put_u64(vds, 8 * MIB - 512);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BadVirtualDiskSize {
            size: 8 * MIB - 512,
            sector_size: 4096,
        },
        &["virtual disk size 8388096", "4096"],
    );
}

#[test]
fn virtual_size_above_64_tib_or_zero() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let pristine = Raw::load(&p);
    for size in [64 * TIB + 512, u64::MAX - 511, 0] {
        let mut r = pristine.clone();
        let vds = r.item(VIRTUAL_DISK_SIZE_GUID).0;
        r.put_u64(vds, size);
        r.save();
        expect_corruption(
            open(&p),
            Corruption::BadVirtualDiskSize {
                size,
                sector_size: 512,
            },
            &["virtual disk size", "64 TiB"],
        );
    }
}

#[test]
fn logical_sector_size_1024() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let lss = r.item(LOGICAL_SECTOR_SIZE_GUID).0;
    r.put_u32(lss, 1024);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BadSectorSize {
            which: "logical",
            size: 1024,
        },
        &["logical sector size 1024"],
    );
}

#[test]
fn metadata_item_with_the_wrong_length() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let e = r.meta_entry(r.meta_index(VIRTUAL_DISK_SIZE_GUID));
    r.put_u32(e + 20, 4);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::MetadataItemLength {
            item: "virtual disk size",
            length: 4,
            expected: 8,
        },
        &["metadata item virtual disk size", "length 4"],
    );
}

#[test]
fn metadata_item_outside_its_region() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let pristine = Raw::load(&p);
    let (_, region_length) = pristine.region(METADATA_REGION_GUID);
    // Past the end of the region, inside the 64 KiB table, and offset set on an empty item.
    for (offset, length) in [
        (region_length as u32 - 4, 8),
        (100, 8),
        (u32::MAX - 3, 8),
        (70000, 0),
    ] {
        let mut r = pristine.clone();
        let e = r.meta_entry(r.meta_index(VIRTUAL_DISK_SIZE_GUID));
        r.put_u32(e + 16, offset);
        r.put_u32(e + 20, length);
        r.save();
        expect_corruption(
            open(&p),
            Corruption::MetadataItemOutOfRegion {
                item: VIRTUAL_DISK_SIZE_GUID,
                offset,
                length,
                region_length,
            },
            &[
                "metadata item 2fa54224-cd1b-4876-b211-5dbed83bf4b8",
                "outside the metadata region",
            ],
        );
    }
}

#[test]
fn metadata_item_overlapping_another() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let fp_offset = r.u32(r.meta_entry(r.meta_index(FILE_PARAMETERS_GUID)) + 16);
    let e = r.meta_entry(r.meta_index(VIRTUAL_DISK_SIZE_GUID));
    r.put_u32(e + 16, fp_offset + 4);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::Overlap {
            a: format!("metadata item {FILE_PARAMETERS_GUID}"),
            b: format!("metadata item {VIRTUAL_DISK_SIZE_GUID}"),
        },
        &["metadata item caa16737", "overlaps metadata item 2fa54224"],
    );
}

#[test]
fn duplicate_metadata_item() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let e = r.meta_entry(r.meta_index(VIRTUAL_DISK_ID_GUID));
    r.put_guid(e, VIRTUAL_DISK_SIZE_GUID);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::DuplicateMetadataItem(VIRTUAL_DISK_SIZE_GUID),
        &["metadata item 2fa54224-cd1b-4876-b211-5dbed83bf4b8 appears more than once"],
    );
}

#[test]
fn missing_virtual_disk_size() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let e = r.meta_entry(r.meta_index(VIRTUAL_DISK_SIZE_GUID));
    // Another (unknown, optional) item takes its place in the table.
    r.put_guid(e, Uuid::from_u128(0x5151));
    r.put_u32(e + 24, 0);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::MissingMetadataItem("virtual disk size"),
        &["required metadata item virtual disk size is missing"],
    );
}

#[test]
fn unknown_required_metadata_item() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let unknown = Uuid::from_u128(0xfeed_f00d);
    r.add_item(unknown, 4, b"hello");
    r.save();
    expect_unsupported(
        open(&p),
        &["unknown required metadata item", &unknown.to_string()],
    );
    // Optional unknown items (system or user) are kept and ignored.
    let e = r.meta_entry(r.meta_count() - 1);
    r.put_u32(e + 24, 1 | 2);
    r.save();
    assert_eq!(open(&p).unwrap().metadata.items.len(), 6);
}

#[test]
fn too_many_user_metadata_items() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    for i in 0..1025u128 {
        r.add_item(Uuid::from_u128(0x1000 + i), 1, &[]);
    }
    // `add_item` gives empty items a non-zero offset; the format wants 0.
    for i in 5..r.meta_count() {
        let e = r.meta_entry(i);
        r.put_u32(e + 16, 0);
    }
    r.save();
    expect_corruption(
        open(&p),
        Corruption::TooManyUserMetadata,
        &["more than 1024 user metadata entries"],
    );
}

// ---------------------------------------------------------------------------------------------
// BAT.

#[test]
fn bat_too_small_for_the_disk() {
    // qemu: 8 MiB blocks and a 1 MiB BAT region for 64 MiB. Claim 64 TiB instead: 8404991
    // entries (512 per chunk, §3.4 of the notes) do not fit, and nothing is allocated for them.
    let d = dir();
    let p = qemu_dynamic(d.path(), "64M");
    let mut r = Raw::load(&p);
    assert_eq!(r.block_size(), 8 * MIB);
    let vds = r.item(VIRTUAL_DISK_SIZE_GUID).0;
    r.put_u64(vds, 64 * TIB);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BatTooSmall {
            region_length: MIB,
            entries: 8_404_991,
        },
        &["BAT region length 0x100000", "8404991 entries"],
    );
}

#[test]
fn bat_entry_beyond_end_of_file() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let offset = TIB;
    r.set_bat(1, offset | FULLY_PRESENT);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BadBlockOffset {
            index: 1,
            entry: offset | FULLY_PRESENT,
            offset,
            reason: format!("starts beyond the end of the file ({:#x})", r.len()),
        },
        &["BAT entry 1", "block at 0x10000000000"],
    );
}

#[test]
fn bat_entry_in_the_header_section() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    r.set_bat(0, FULLY_PRESENT);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BadBlockOffset {
            index: 0,
            entry: FULLY_PRESENT,
            offset: 0,
            reason: "lies in the header section".into(),
        },
        &["BAT entry 0", "header section"],
    );
}

#[test]
fn bat_entry_overlapping_the_log_or_a_region() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let pristine = Raw::load(&p);
    let (log_offset, _) = pristine.log();
    let meta = pristine.meta();
    for (target, what) in [
        (log_offset, format!("the log at {log_offset:#x}")),
        (
            meta,
            format!("the region {METADATA_REGION_GUID} at {meta:#x}"),
        ),
    ] {
        let mut r = pristine.clone();
        r.set_bat(0, target | FULLY_PRESENT);
        r.save();
        expect_corruption(
            open(&p),
            Corruption::BadBlockOffset {
                index: 0,
                entry: target | FULLY_PRESENT,
                offset: target,
                reason: format!("overlaps {what}"),
            },
            &["BAT entry 0", &what],
        );
    }
}

#[test]
fn two_bat_entries_at_the_same_offset() {
    // Windows-made: the btrfs fixture has two FULLY_PRESENT blocks; point the second at the first.
    let (_fx, p) = common::fixture("discutils-btrfs");
    let mut r = Raw::load(&p);
    let present = r.present_entries();
    assert_eq!(present.len(), 2, "the fixture has two allocated blocks");
    let (first, entry) = present[0];
    let (second, _) = present[1];
    r.set_bat(second, entry);
    r.save();
    let offset = entry & !0xfffff;
    expect_corruption(
        open(&p),
        Corruption::DuplicateBlockOffset {
            first,
            second,
            offset,
        },
        &[
            &format!("BAT entries {first} and {second}"),
            &format!("file offset {offset:#x}"),
        ],
    );
}

#[test]
fn overlapping_blocks() {
    // Ours fixed: 2 MiB blocks; move block 1 to start 1 MiB into block 0.
    let d = dir();
    let p = ours_fixed_4k(d.path());
    let mut r = Raw::load(&p);
    let e0 = r.bat_entry(0);
    let b0 = e0 & !0xfffff;
    r.set_bat(1, (b0 + MIB) | FULLY_PRESENT);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::Overlap {
            a: format!("the block of BAT entry 0 at {b0:#x}"),
            b: format!("the block of BAT entry 1 at {:#x}", b0 + MIB),
        },
        &["block of BAT entry 0", "overlaps the block of BAT entry 1"],
    );
}

#[test]
fn invalid_block_state_4() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    r.set_bat(1, 4);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BadBlockState {
            index: 1,
            entry: 4,
            state: 4,
            context: "a payload block",
        },
        &["BAT entry 1", "state 4 is not valid for a payload block"],
    );
}

#[test]
fn partially_present_in_a_non_differencing_file() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let at = r.append(32 * MIB, 0);
    r.set_bat(0, at | PARTIALLY_PRESENT);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BadBlockState {
            index: 0,
            entry: at | PARTIALLY_PRESENT,
            state: 7,
            context: "a payload block of a non-differencing file",
        },
        &["state 7", "non-differencing"],
    );
}

#[test]
fn sector_bitmap_entry_in_a_non_differencing_file() {
    // 8 GiB in 32 MiB blocks: chunk ratio 128, so BAT entry 128 is chunk 0's sector bitmap.
    let d = dir();
    let p = new_file(
        d.path(),
        "big.vhdx",
        CreateOptions {
            virtual_size: Some(8 * GIB),
            ..Default::default()
        },
    );
    let mut r = Raw::load(&p);
    assert_eq!(r.chunk_ratio(), 128);
    let at = r.append(MIB, 0);
    r.set_bat(128, at | SB_PRESENT);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BadBlockState {
            index: 128,
            entry: at | SB_PRESENT,
            state: 6,
            context: "a sector bitmap entry of a non-differencing file",
        },
        &["BAT entry 128", "sector bitmap entry"],
    );
}

#[test]
fn differencing_partially_present_without_its_sector_bitmap() {
    let d = dir();
    let (_, child) = ours_chain(d.path());
    let mut r = Raw::load(&child);
    let at = r.append(MIB, 0);
    r.set_bat(3, at | PARTIALLY_PRESENT);
    r.save();
    expect_corruption(
        open(&child),
        Corruption::MissingSectorBitmap { index: 3, chunk: 0 },
        &["BAT entry 3", "sector bitmap block is not present"],
    );
}

#[test]
fn differencing_entry_past_the_last_block_in_use() {
    // 8 blocks, but the differencing BAT has a whole chunk: 4096 payload entries and the SB.
    let d = dir();
    let (_, child) = ours_chain(d.path());
    let mut r = Raw::load(&child);
    r.set_bat(100, 2);
    r.save();
    expect_corruption(
        open(&child),
        Corruption::BadBlockState {
            index: 100,
            entry: 2,
            state: 2,
            context: "an entry past the last payload block",
        },
        &["BAT entry 100"],
    );
}

// ---------------------------------------------------------------------------------------------
// Parent locators and chains.

fn locator(entries: &[(&str, &str)]) -> ParentLocator {
    ParentLocator {
        entries: entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[test]
fn has_parent_without_a_locator() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    r.set_file_parameter_flags(2);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::MissingParentLocator,
        &["HasParent", "without a parent locator"],
    );
}

#[test]
fn locator_in_a_file_without_has_parent() {
    let d = dir();
    let (_, child) = ours_chain(d.path());
    let mut r = Raw::load(&child);
    r.set_file_parameter_flags(0);
    r.save();
    expect_corruption(
        open(&child),
        Corruption::UnexpectedParentLocator,
        &["parent locator present in a file without HasParent"],
    );
}

#[test]
fn locator_key_offset_outside_the_item() {
    let d = dir();
    let (_, child) = ours_chain(d.path());
    let mut r = Raw::load(&child);
    let (item, len) = r.item(PARENT_LOCATOR_GUID);
    // Entry 0 (parent_linkage): key 28 bytes long, its offset moved to the item's last bytes.
    let key_len = r.u16(item + 20 + 8);
    r.put_u32(item + 20, len - 2);
    r.save();
    let reason = format!(
        "entry 0: key at {} length {key_len} is empty or outside the item",
        len - 2
    );
    expect_corruption(
        open(&child),
        Corruption::BadParentLocator(reason),
        &["parent locator: entry 0: key"],
    );
}

#[test]
fn locator_without_parent_linkage() {
    let d = dir();
    let (_, child) = ours_chain(d.path());
    let mut r = Raw::load(&child);
    let (item, len) = r.item(PARENT_LOCATOR_GUID);
    let key: Vec<u8> = "parent_linkage"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let at = r
        .bytes(item, u64::from(len))
        .windows(key.len())
        .position(|w| w == key)
        .expect("the key is in the locator") as u64;
    // "parent_linkage" → "parent_linkagx": same length, no longer the key.
    r.put(item + at + key.len() as u64 - 2, &[b'x', 0]);
    r.save();
    expect_corruption(
        open(&child),
        Corruption::BadParentLocator("parent_linkage is missing".into()),
        &["parent locator: parent_linkage is missing"],
    );
}

/// A parent locator of 65,535 entries (the most its u16 count allows) with distinct keys, in
/// under 1 MiB: the table, then one string of UTF-16 units in which every key is two adjacent
/// units at its own offset (a de Bruijn sequence over 256 letters: every pair occurs once) and
/// every value is the same unit. The last two entries are parent_linkage and relative_path.
/// With `duplicate`, the last de Bruijn key repeats the first.
fn many_key_locator(duplicate: bool) -> Vec<u8> {
    const N: usize = 65_535;
    let letters = 256u16;
    let mut units: Vec<u16> = Vec::new();
    for a in 0..letters {
        units.push(0x100 + a);
        for b in a + 1..letters {
            units.extend([0x100 + a, 0x100 + b]);
        }
    }
    units.push(0x100);
    let keys = N - 2;
    let table_end = 20 + N * 12;
    let mut strings: Vec<u8> = units.iter().flat_map(|u| u.to_le_bytes()).collect();
    let mut add = |s: &str| {
        let at = table_end + strings.len();
        let bytes: Vec<u8> = s.encode_utf16().flat_map(u16::to_le_bytes).collect();
        strings.extend(&bytes);
        (at as u32, bytes.len() as u16)
    };
    let value = add("v");
    let named = [
        (
            add("parent_linkage"),
            add("{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}"),
        ),
        (add("relative_path"), add("parent.vhdx")),
    ];
    let mut item = Vec::with_capacity(table_end + strings.len());
    item.extend(VHDX_LOCATOR_TYPE_GUID.to_bytes_le());
    item.extend(0u16.to_le_bytes());
    item.extend((N as u16).to_le_bytes());
    let mut entry = |(ko, kl): (u32, u16), (vo, vl): (u32, u16)| {
        item.extend(ko.to_le_bytes());
        item.extend(vo.to_le_bytes());
        item.extend(kl.to_le_bytes());
        item.extend(vl.to_le_bytes());
    };
    for i in 0..keys {
        let k = if duplicate && i == keys - 1 { 0 } else { i };
        entry(((table_end + 2 * k) as u32, 4), value);
    }
    for (k, v) in named {
        entry(k, v);
    }
    item.extend(strings);
    assert!(item.len() <= MIB as usize, "{} bytes", item.len());
    item
}

/// The duplicate-key check of a locator with 65,535 keys must not be quadratic (it took 7 s of
/// CPU on every open): a duplicate is found, and distinct keys are accepted.
#[test]
fn locator_with_65535_keys() {
    for duplicate in [true, false] {
        let d = dir();
        let p = ours_dynamic(d.path());
        let mut r = Raw::load(&p);
        let fp = r.item(FILE_PARAMETERS_GUID).0;
        let flags = r.u32(fp + 4);
        r.set_file_parameter_flags(flags | 2);
        r.add_item(PARENT_LOCATOR_GUID, 4, &many_key_locator(duplicate));
        r.save();
        let start = std::time::Instant::now();
        let opened = open(&p);
        println!("open (duplicate: {duplicate}): {:?}", start.elapsed());
        if duplicate {
            // Key 0 is units 0x100, 0x100.
            expect_corruption(
                opened,
                Corruption::BadParentLocator("key \"\u{100}\u{100}\" appears twice".into()),
                &["appears twice"],
            );
        } else {
            let f = opened.expect("65,535 distinct keys are a valid locator");
            let l = f.metadata.parent_locator.as_ref().expect("a locator");
            assert_eq!(l.entries.len(), 65_535);
            assert_eq!(l.get(KEY_RELATIVE_PATH), Some("parent.vhdx"));
        }
    }
}

#[test]
fn locator_of_an_unknown_type() {
    let d = dir();
    let (_, child) = ours_chain(d.path());
    let mut r = Raw::load(&child);
    let (item, _) = r.item(PARENT_LOCATOR_GUID);
    r.put_guid(item, Uuid::from_u128(0xabcdef));
    r.save();
    expect_unsupported(
        open(&child),
        &["parent locator type 00000000-0000-0000-0000-000000abcdef"],
    );
}

#[test]
fn linkage_mismatch_after_the_parent_changed() {
    let d = dir();
    let (parent, child) = ours_chain(d.path());
    let mut r = Raw::load(&parent);
    let expected = r.data_write_guid();
    let changed = Uuid::from_u128(0x1234_5678);
    r.edit_headers(H_DATA_WRITE_GUID, &changed.to_bytes_le());
    r.save();
    let (e, msg) = expect_chain_error(open_chain(&child, &ChainOptions::default()));
    match e {
        ChainError::LinkageMismatch {
            child: c,
            parent: p,
            expected: exp,
            found,
        } => {
            assert_eq!(c, child);
            assert_eq!(std::fs::canonicalize(&p).unwrap(), parent);
            assert_eq!(exp, format_guid_string(expected));
            assert_eq!(found, changed);
        }
        other => panic!("expected LinkageMismatch, got {other:?}"),
    }
    assert!(msg.contains("DataWriteGuid"), "{msg}");
    assert!(msg.contains(&changed.to_string()), "{msg}");
}

#[test]
fn parent_virtual_size_mismatch() {
    let d = dir();
    let (parent, child) = ours_chain(d.path());
    let mut r = Raw::load(&parent);
    let vds = r.item(VIRTUAL_DISK_SIZE_GUID).0;
    r.put_u64(vds, 16 * MIB);
    r.save();
    let (e, msg) = expect_chain_error(open_chain(&child, &ChainOptions::default()));
    match e {
        ChainError::VirtualSizeMismatch {
            child_size,
            parent_size,
            ..
        } => assert_eq!((child_size, parent_size), (8 * MIB, 16 * MIB)),
        other => panic!("expected VirtualSizeMismatch, got {other:?}"),
    }
    assert!(msg.contains("virtual size 16777216"), "{msg}");
}

#[test]
fn parent_logical_sector_size_mismatch() {
    let d = dir();
    let (parent, child) = ours_chain(d.path());
    let mut r = Raw::load(&parent);
    let lss = r.item(LOGICAL_SECTOR_SIZE_GUID).0;
    r.put_u32(lss, 4096);
    r.save();
    let (e, msg) = expect_chain_error(open_chain(&child, &ChainOptions::default()));
    match e {
        ChainError::SectorSizeMismatch {
            child_size,
            parent_size,
            ..
        } => assert_eq!((child_size, parent_size), (512, 4096)),
        other => panic!("expected SectorSizeMismatch, got {other:?}"),
    }
    assert!(msg.contains("logical sector size 4096"), "{msg}");
}

#[test]
fn locator_loop_between_two_files() {
    // child → parent, then the parent is edited into a differencing file whose parent is child.
    let d = dir();
    let (parent, child) = ours_chain(d.path());
    let child_guid = Raw::load(&child).data_write_guid();
    let mut r = Raw::load(&parent);
    r.make_differencing(&locator(&[
        ("parent_linkage", &format_guid_string(child_guid)),
        ("relative_path", r"..\child.vhdx"),
    ]));
    r.save();
    let (e, msg) = expect_chain_error(open_chain(&child, &ChainOptions::default()));
    match e {
        ChainError::Loop(p) => assert_eq!(std::fs::canonicalize(p).unwrap(), child),
        other => panic!("expected Loop, got {other:?}"),
    }
    assert!(msg.contains("loops") && msg.contains("child.vhdx"), "{msg}");
}

#[test]
fn locator_loop_onto_itself() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let own = r.data_write_guid();
    r.make_differencing(&locator(&[
        ("parent_linkage", &format_guid_string(own)),
        ("relative_path", "dynamic.vhdx"),
    ]));
    r.save();
    let (e, _) = expect_chain_error(open_chain(&p, &ChainOptions::default()));
    assert!(matches!(e, ChainError::Loop(_)), "{e:?}");
}

#[test]
fn parent_not_found_lists_the_paths_tried() {
    let d = dir();
    let (parent, child) = ours_chain(d.path());
    std::fs::rename(&parent, d.path().join("base/moved.vhdx")).unwrap();
    let (e, msg) = expect_chain_error(open_chain(&child, &ChainOptions::default()));
    match &e {
        ChainError::ParentNotFound { child: c, tried } => {
            assert_eq!(c, &child);
            assert!(
                tried.contains(r#"relative_path "base\\parent.vhdx""#),
                "{tried}"
            );
            assert!(tried.contains("absolute_win32_path"), "{tried}");
        }
        other => panic!("expected ParentNotFound, got {other:?}"),
    }
    // The resolved relative path and the recorded absolute one are both in the message.
    assert!(msg.contains(&parent.display().to_string()), "{msg}");
    assert!(msg.contains(r"parent.vhdx"), "{msg}");
    // Pointing at the moved parent explicitly works.
    let opts = ChainOptions {
        parent_overrides: vec![d.path().join("base/moved.vhdx")],
        ..Default::default()
    };
    assert_eq!(open_chain(&child, &opts).unwrap().layers().len(), 2);
}

#[test]
fn chain_deeper_than_max_chain_depth() {
    // One differencing file whose own DataWriteGuid is the linkage its locator expects, copied
    // 65 times: each copy is a valid parent of the previous one, and `parent_overrides` strings
    // them together without creating 65 files through `create`.
    let d = dir();
    let (parent, child) = ours_chain(d.path());
    let mut r = Raw::load(&child);
    let linkage = Raw::load(&parent).data_write_guid();
    r.edit_headers(H_DATA_WRITE_GUID, &linkage.to_bytes_le());
    let copies: Vec<PathBuf> = (0..=MAX_CHAIN_DEPTH)
        .map(|i| {
            let p = d.path().join(format!("c{i}.vhdx"));
            std::fs::write(&p, &r.b).unwrap();
            p
        })
        .collect();
    // Exactly MAX_CHAIN_DEPTH files: 63 differencing copies and the real base.
    let mut overrides: Vec<PathBuf> = copies[1..MAX_CHAIN_DEPTH - 1].to_vec();
    overrides.push(parent.clone());
    let opts = ChainOptions {
        parent_overrides: overrides,
        ..Default::default()
    };
    let chain = open_chain(&copies[0], &opts).expect("64 files are allowed");
    assert_eq!(chain.layers().len(), MAX_CHAIN_DEPTH);
    // One more differencing file: refused.
    let opts = ChainOptions {
        parent_overrides: copies[1..].to_vec(),
        ..Default::default()
    };
    let (e, msg) = expect_chain_error(open_chain(&copies[0], &opts));
    assert!(
        matches!(e, ChainError::TooDeep(MAX_CHAIN_DEPTH)),
        "{e:?}: {msg}"
    );
    assert!(msg.contains("deeper than 64 files"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Log.

const LOG_GUID: Uuid = Uuid::from_u128(0x10c6_10c6_10c6_10c6);

fn page(fill: u8) -> Box<[u8; 4096]> {
    Box::new([fill; 4096])
}

#[test]
fn log_guid_set_but_no_valid_entry() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    r.edit_headers(H_LOG_GUID, &LOG_GUID.to_bytes_le());
    r.save();
    expect_corruption(
        open(&p),
        Corruption::NoValidLogSequence,
        &["log: LogGuid is set but no valid log sequence"],
    );
}

#[test]
fn valid_log_entry_is_replayed_in_memory() {
    // The positive control for the log cases below: the same kind of entry, undamaged.
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let bat = r.bat();
    let data_at = r.append(32 * MIB, 0xaa);
    let mut bat_page = page(0);
    bat_page[..8].copy_from_slice(&(data_at | FULLY_PRESENT).to_le_bytes());
    let size = r.len();
    let entry = build_entry(
        LOG_GUID,
        1,
        0,
        size,
        size,
        &[LogOp::Data {
            file_offset: bat,
            data: bat_page,
        }],
    );
    r.put_log_entry(0, &entry, LOG_GUID);
    r.save();
    let f = open(&p).unwrap();
    assert_eq!(f.log_state, LogState::ReplayedInMemory { entries: 1 });
    let mut first = None;
    f.map(0, 512, &mut |s, _| first = Some(s)).unwrap();
    assert_eq!(first, Some(Source::Data(data_at)));
}

/// Puts a log entry into the file that grows it by 32 MiB: block 0 moves to the old end of the
/// file (its entry changed in a copy of the BAT's first page) and its first page is written with
/// 0xab; then the changes in `more`.
fn put_log_entry_growing_the_file(r: &mut Raw, more: Vec<LogOp>) {
    let size = r.len();
    let bat = r.bat();
    let mut bat_page = page(0);
    bat_page.copy_from_slice(r.bytes(bat, 4096));
    bat_page[..8].copy_from_slice(&(size | FULLY_PRESENT).to_le_bytes());
    let mut ops = vec![
        LogOp::Data {
            file_offset: bat,
            data: bat_page,
        },
        LogOp::Data {
            file_offset: size,
            data: page(0xab),
        },
    ];
    ops.extend(more);
    let entry = build_entry(LOG_GUID, 1, 0, size, size + 32 * MIB, &ops);
    r.put_log_entry(0, &entry, LOG_GUID);
}

#[test]
fn read_only_replay_matches_the_real_replay_when_the_log_extends_the_file() {
    // The log writes a page past the current end of the file and extends the file to
    // LastFileOffset: the in-memory replay of a read-only open must show what a writable open
    // (which replays into the file) shows.
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let size = r.len();
    assert_eq!(size % MIB, 0);
    put_log_entry_growing_the_file(&mut r, vec![]);
    r.save();
    let copy = d.path().join("copy.vhdx");
    std::fs::copy(&p, &copy).unwrap();

    let read_block_0 = |path: &Path, writable: bool| {
        let f = VhdxFile::open(path, writable).unwrap();
        let chain = Chain::from_layers(vec![f]).unwrap();
        let mut buf = vec![0u8; 8192];
        chain.read_at(&mut buf, 0).unwrap();
        buf
    };
    let replayed = read_block_0(&copy, true);
    assert!(replayed[..4096].iter().all(|&b| b == 0xab));
    assert!(replayed[4096..].iter().all(|&b| b == 0));
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), size + 32 * MIB);
    let in_memory = read_block_0(&p, false);
    assert!(
        in_memory == replayed,
        "a read-only open reads block 0 differently from the replayed file"
    );
}

#[test]
fn check_replays_the_log_of_a_differencing_child_and_leaves_its_parent_alone() {
    // Replaying needs the child writable; its parent is opened read-only beside it (the check
    // once reopened the child for the chain and ran into its own write lock).
    let d = dir();
    let (parent, child) = ours_chain(d.path());
    let mut r = Raw::load(&child);
    assert_eq!(r.len() % MIB, 0);
    put_log_entry_growing_the_file(&mut r, vec![]);
    r.save();
    let parent_before = std::fs::read(&parent).unwrap();
    let child_before = std::fs::read(&child).unwrap();
    for repair in [Repair::None, Repair::Leaks] {
        let report = check(&child, repair, &[]);
        assert_eq!(report.check_errors, 0, "{repair:?}: {report:?}");
        assert!(
            report.corruptions.len() == 1 && report.corruptions[0].contains("-r all"),
            "{repair:?}: the unapplied log is the one finding: {report:?}"
        );
        assert!(
            std::fs::read(&child).unwrap() == child_before,
            "{repair:?} changed a child whose log it must not replay"
        );
    }
    let report = check(&child, Repair::All, &[]);
    assert_eq!(report.check_errors, 0, "{report:?}");
    assert!(report.corruptions.is_empty(), "{report:?}");
    assert_eq!(report.corruptions_fixed, 1, "{report:?}");
    assert!(
        std::fs::read(&parent).unwrap() == parent_before,
        "check -r all of the child changed its parent"
    );
    assert_eq!(open(&child).unwrap().log_state, LogState::Clean);
    let chain = open_chain(&child, &ChainOptions::default()).unwrap();
    let mut buf = vec![0u8; 8192];
    chain.read_at(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0xab), "the replayed page");
    assert!(buf[4096..].iter().all(|&b| b == 0));
}

#[test]
fn check_of_a_child_reports_but_never_replays_its_parents_log() {
    let d = dir();
    let (parent, child) = ours_chain(d.path());
    let mut r = Raw::load(&parent);
    assert_eq!(r.len() % MIB, 0);
    put_log_entry_growing_the_file(&mut r, vec![]);
    r.save();
    let parent_before = std::fs::read(&parent).unwrap();
    for repair in [Repair::None, Repair::Leaks, Repair::All] {
        let report = check(&child, repair, &[]);
        assert_eq!(report.check_errors, 0, "{repair:?}: {report:?}");
        assert!(report.corruptions.is_empty(), "{repair:?}: {report:?}");
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("parent.vhdx has a log that was never applied")),
            "{repair:?}: {report:?}"
        );
        assert!(
            std::fs::read(&parent).unwrap() == parent_before,
            "{repair:?} of the child changed its parent"
        );
    }
}

#[test]
fn real_replay_zeroes_what_an_earlier_change_wrote_past_the_end_of_the_file() {
    // One entry writes a page past the end of the file, then zeroes it: both replays must end
    // with zeros there.
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let size = r.len();
    put_log_entry_growing_the_file(
        &mut r,
        vec![LogOp::Zero {
            file_offset: size,
            length: 4096,
        }],
    );
    r.save();
    let copy = d.path().join("copy.vhdx");
    std::fs::copy(&p, &copy).unwrap();
    for (path, writable) in [(&p, false), (&copy, true)] {
        let f = VhdxFile::open(path, writable).unwrap();
        let chain = Chain::from_layers(vec![f]).unwrap();
        let mut buf = vec![0xeeu8; 4096];
        chain.read_at(&mut buf, 0).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "writable {writable}: the zeroed page still holds {:#x}",
            buf[0]
        );
    }
}

#[test]
fn log_flushed_file_offset_beyond_the_file() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let size = r.len();
    let entry = build_entry(
        LOG_GUID,
        1,
        0,
        size + MIB,
        size,
        &[LogOp::Zero {
            file_offset: r.bat(),
            length: 4096,
        }],
    );
    r.put_log_entry(0, &entry, LOG_GUID);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::LogFileTruncated {
            file_size: size,
            flushed: size + MIB,
        },
        &["log:", "FlushedFileOffset", "truncated"],
    );
}

#[test]
fn log_entry_targeting_the_headers() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let size = r.len();
    let entry = build_entry(
        LOG_GUID,
        1,
        0,
        size,
        size,
        &[LogOp::Data {
            file_offset: HEADER_OFFSETS[1],
            data: page(0),
        }],
    );
    r.put_log_entry(0, &entry, LOG_GUID);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BadLogEntry {
            offset: 0,
            reason: "a change at 0x20000 length 0x1000 would overwrite the file identifier or a \
                     header"
                .into(),
        },
        &["log entry at log offset 0x0"],
    );
    // A writable open refuses it too, before writing anything.
    let before = std::fs::read(&p).unwrap();
    assert!(matches!(
        VhdxFile::open(&p, true),
        Err(Error::Corrupt(Corruption::BadLogEntry { .. }))
    ));
    assert!(std::fs::read(&p).unwrap() == before);
}

#[test]
fn log_entry_error_names_the_entry_position() {
    // The same refused change in an entry at log offset 0x3000 (its own Tail): the error says
    // where the entry is.
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let size = r.len();
    let entry = build_entry(
        LOG_GUID,
        1,
        0x3000,
        size,
        size,
        &[LogOp::Zero {
            file_offset: 0,
            length: 4096,
        }],
    );
    r.put_log_entry(0x3000, &entry, LOG_GUID);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BadLogEntry {
            offset: 0x3000,
            reason: "a change at 0x0 length 0x1000 would overwrite the file identifier or a header"
                .into(),
        },
        &["log entry at log offset 0x3000"],
    );
}

#[test]
fn log_entry_targeting_the_log_itself() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let size = r.len();
    let (log_offset, _) = r.log();
    let entry = build_entry(
        LOG_GUID,
        1,
        0,
        size,
        size,
        &[LogOp::Zero {
            file_offset: log_offset + 8192,
            length: 8192,
        }],
    );
    r.put_log_entry(0, &entry, LOG_GUID);
    r.save();
    expect_corruption(
        open(&p),
        Corruption::BadLogEntry {
            offset: 0,
            reason: format!(
                "a change at {:#x} length 0x2000 would overwrite the log",
                log_offset + 8192
            ),
        },
        &["log entry", "would overwrite the log"],
    );
}

#[test]
fn log_with_a_torn_data_sector() {
    // The entry's checksum is re-stamped, so only the data sector's split sequence number
    // (SequenceLow, bytes 4092..4096) shows the tear.
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let size = r.len();
    let mut entry = build_entry(
        LOG_GUID,
        5,
        0,
        size,
        size,
        &[LogOp::Data {
            file_offset: r.bat(),
            data: page(0),
        }],
    );
    assert_eq!(entry.len(), 8192);
    entry[4096 + 4092..].copy_from_slice(&6u32.to_le_bytes());
    stamp_crc(&mut entry, 4);
    r.put_log_entry(0, &entry, LOG_GUID);
    r.save();
    expect_corruption(open(&p), Corruption::NoValidLogSequence, &["no valid log"]);
}

#[test]
fn log_larger_than_the_engine_reads() {
    // A 512 MiB log in a sparse file: refused without reading (or allocating) it.
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let log_at = r.len().div_ceil(MIB) * MIB;
    r.edit_headers(H_LOG_OFFSET, &log_at.to_le_bytes());
    r.edit_headers(H_LOG_LENGTH, &(512 * MIB as u32).to_le_bytes());
    r.edit_headers(H_LOG_GUID, &LOG_GUID.to_bytes_le());
    r.save();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(log_at + 512 * MIB).unwrap();
    expect_unsupported(open(&p), &["log of 536870912 bytes"]);
}

#[test]
fn writable_open_of_a_file_with_no_valid_log_changes_nothing() {
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    r.edit_headers(H_LOG_GUID, &LOG_GUID.to_bytes_le());
    r.save();
    expect_corruption(
        VhdxFile::open(&p, true),
        Corruption::NoValidLogSequence,
        &["no valid log sequence"],
    );
    assert!(std::fs::read(&p).unwrap() == r.b, "the file was modified");
}

/// A file with a `size_mib` MiB log whose every sector is prepared by `fill(log, sector)`,
/// opened from memory; asserts it is refused with NoValidLogSequence within a few seconds and
/// without an allocation larger than the log itself.
fn hostile_log(size_mib: u64, fill: impl Fn(&mut [u8], usize, u64)) {
    let d = dir();
    let p = new_file(
        d.path(),
        "biglog.vhdx",
        CreateOptions {
            virtual_size: Some(64 * MIB),
            log_size: Some(size_mib * MIB),
            ..Default::default()
        },
    );
    let mut r = Raw::load(&p);
    let (log_offset, log_len) = r.log();
    let file_size = r.len();
    {
        let log = &mut r.b[log_offset as usize..(log_offset + log_len) as usize];
        for sector in 0..(log_len / 4096) as usize {
            fill(log, sector, file_size);
        }
    }
    r.edit_headers(H_LOG_GUID, &LOG_GUID.to_bytes_le());
    let storage = Arc::new(MemStorage::new(r.b));
    let started = std::time::Instant::now();
    let (result, peak) = peak_alloc(|| VhdxFile::open_storage(storage, p.clone(), false));
    let elapsed = started.elapsed();
    expect_corruption(result, Corruption::NoValidLogSequence, &["log"]);
    assert!(
        elapsed < std::time::Duration::from_secs(5),
        "refusing the hostile log took {elapsed:?}"
    );
    assert!(
        peak <= (log_len + MIB) as usize,
        "one allocation of {peak} bytes"
    );
}

#[test]
fn hostile_log_every_sector_claims_the_whole_log() {
    // 16384 entry headers, each claiming to be 64 MiB long: refusing one must cost one sector
    // (it cost a copy of the whole log each, 522 s in all, before the fix).
    hostile_log(64, |log, sector, size| {
        let header = build_entry(LOG_GUID, 1, 0, size, size, &[]);
        let at = sector * 4096;
        log[at..at + 64].copy_from_slice(&header[..64]);
        log[at + 8..at + 12].copy_from_slice(&(64 * MIB as u32).to_le_bytes());
    });
}

#[test]
fn hostile_log_one_long_incomplete_run() {
    // Sector 0 empty, then 16383 valid one-sector entries in sequence whose head's Tail is
    // sector 0: no run is complete (7 s to refuse before the fix, walking the run from each of
    // its sectors).
    hostile_log(64, |log, sector, size| {
        if sector > 0 {
            let e = build_entry(LOG_GUID, 100 + sector as u64, 0, size, size, &[]);
            log[sector * 4096..(sector + 1) * 4096].copy_from_slice(&e);
        }
    });
}

#[test]
fn parent_that_is_not_a_vhdx() {
    let d = dir();
    let (parent, child) = ours_chain(d.path());
    std::fs::write(&parent, vec![0u8; 2 * MIB as usize]).unwrap();
    let (e, msg) = expect_chain_error(open_chain(&child, &ChainOptions::default()));
    match e {
        ChainError::Open { path, source } => {
            assert_eq!(std::fs::canonicalize(path).unwrap(), parent);
            assert!(matches!(
                *source,
                Error::Corrupt(Corruption::BadFileSignature)
            ));
        }
        other => panic!("expected Open, got {other:?}"),
    }
    assert!(
        msg.contains("cannot open") && msg.contains("parent.vhdx"),
        "{msg}"
    );
    assert!(msg.contains("vhdxfile"), "{msg}");
}

#[test]
fn locator_value_that_is_not_utf16() {
    let d = dir();
    let (_, child) = ours_chain(d.path());
    let mut r = Raw::load(&child);
    let (item, _) = r.item(PARENT_LOCATOR_GUID);
    // Entry 1's value (the relative path) starts with a lone low surrogate.
    let value = item + u64::from(r.u32(item + 20 + 12 + 4));
    r.put(value, &0xdc00u16.to_le_bytes());
    r.save();
    expect_corruption(
        open(&child),
        Corruption::BadParentLocator("the value of \"relative_path\" is not valid UTF-16".into()),
        &["parent locator", "relative_path", "UTF-16"],
    );
}

#[test]
fn last_block_cut_short_by_the_end_of_the_file_reads_as_zeros() {
    // Old qemu made fixed files whose last block stopped short of the end; that is accepted,
    // and the missing bytes read as zeros (not as whatever follows).
    let d = dir();
    let p = ours_dynamic(d.path());
    let mut r = Raw::load(&p);
    let at = r.allocate(1, 0x77);
    r.b.truncate((at + MIB) as usize);
    r.save();
    let chain = open_chain(&p, &ChainOptions::default()).unwrap();
    let mut buf = vec![0xeeu8; 4096];
    chain.read_at(&mut buf, 32 * MIB + MIB - 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0x77));
    chain.read_at(&mut buf, 32 * MIB + MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

// ---------------------------------------------------------------------------------------------
// Mutation smoke test.

/// SplitMix64: tiny, and its sequence never changes with a dependency upgrade, so a failing seed
/// stays reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A valid file to mutate, with the byte ranges worth aiming at.
struct Base {
    name: &'static str,
    path: PathBuf,
    bytes: Vec<u8>,
    /// The parent on disk, for a differencing base.
    parent: Option<PathBuf>,
    /// (offset, length, weight) of the structures.
    targets: Vec<(u64, u64, u64)>,
    /// (file offset, length) of the first log entry, for a base with a log to replay.
    log_entry: Option<(u64, u64)>,
}

impl Base {
    fn new(name: &'static str, path: PathBuf, parent: Option<PathBuf>) -> Base {
        let r = Raw::load(&path);
        VhdxFile::open_storage(Arc::new(MemStorage::new(r.b.clone())), path.clone(), false)
            .unwrap_or_else(|e| panic!("base {name} must open: {e}"));
        let mut targets = vec![(0, 520, 1)];
        for h in HEADER_OFFSETS {
            targets.push((h, 80, 6));
            targets.push((h, HEADER_LEN, 1));
        }
        for t in REGION_TABLE_OFFSETS {
            targets.push((t, 16 + 32 * u64::from(r.region_count()), 6));
        }
        let meta = r.meta();
        targets.push((meta, 32 + 32 * u64::from(r.meta_count()), 8));
        for i in 0..r.meta_count() {
            let e = r.meta_entry(i);
            let (offset, length) = (u64::from(r.u32(e + 16)), u64::from(r.u32(e + 20)));
            targets.push((meta + offset, length.max(1), 4));
        }
        let (bat, bat_len) = r.region(BAT_REGION_GUID);
        targets.push((bat, bat_len.min(64), 6));
        targets.push((bat, bat_len.min(32 * KIB), 4));
        let (log_offset, log_len) = r.log();
        let log_guid = r.guid(r.header_field(r.current_slot(), H_LOG_GUID));
        let log_entry = (!log_guid.is_nil()).then(|| {
            let len = u64::from(r.u32(log_offset + 8));
            targets.push((log_offset, 64, 6));
            targets.push((log_offset, len.min(log_len), 4));
            (log_offset, len)
        });
        if log_entry.is_none() {
            targets.push((log_offset, 4096, 1));
        }
        // Sector bitmap blocks of a differencing file.
        if r.meta_index_opt(PARENT_LOCATOR_GUID).is_some() {
            let cr = r.chunk_ratio();
            let sb = r.bat_entry(cr);
            if sb & 7 == SB_PRESENT {
                targets.push((sb & !0xfffff, 4096, 4));
            }
        }
        // Anywhere in the first 4 MiB.
        targets.push((0, r.len().min(4 * MIB), 3));
        Base {
            name,
            path,
            bytes: r.b,
            parent,
            targets,
            log_entry,
        }
    }
}

/// The mutation smoke bases: ours dynamic (with allocated, zero and unmapped blocks), ours
/// fixed with 4 KiB sectors, ours differencing (fully and partially present blocks, a sector
/// bitmap) over a parent on disk, ours with a log to replay, and two Windows fixtures (one with a
/// dirty log).
fn smoke_bases(dir: &Path) -> (Vec<Base>, Vec<tempfile::TempDir>) {
    let mut bases = Vec::new();
    let mut keep = Vec::new();

    let p = new_file(
        dir,
        "smoke-dynamic.vhdx",
        CreateOptions {
            virtual_size: Some(32 * MIB),
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    );
    let mut r = Raw::load(&p);
    for (block, fill) in [(0, 0x11), (5, 0x55), (31, 0x31)] {
        r.allocate(block, fill);
    }
    r.set_bat(7, 2);
    r.set_bat(9, 3);
    r.save();
    bases.push(Base::new("ours-dynamic", p.clone(), None));

    // The same file with a pending log entry that allocates block 12 and zeroes block 5's BAT
    // page neighbour.
    let dirty = dir.join("smoke-dirty.vhdx");
    let mut r = Raw::load(&p);
    r.path = dirty.clone();
    let bat = r.bat();
    let at = r.append(MIB, 0xc2);
    let mut bat_page = page(0);
    bat_page.copy_from_slice(r.bytes(bat, 4096));
    bat_page[12 * 8..13 * 8].copy_from_slice(&(at | FULLY_PRESENT).to_le_bytes());
    let size = r.len();
    let entry = build_entry(
        LOG_GUID,
        41,
        0,
        size,
        size,
        &[
            LogOp::Data {
                file_offset: bat,
                data: bat_page,
            },
            LogOp::Zero {
                file_offset: r.meta() + 512 * KIB,
                length: 8192,
            },
        ],
    );
    r.put_log_entry(0, &entry, LOG_GUID);
    r.save();
    bases.push(Base::new("ours-dirty-log", dirty, None));

    let p = new_file(
        dir,
        "smoke-fixed4k.vhdx",
        CreateOptions {
            virtual_size: Some(16 * MIB),
            block_size: Some(MIB as u32),
            logical_sector_size: Some(4096),
            subformat: Subformat::Fixed,
            ..Default::default()
        },
    );
    bases.push(Base::new("ours-fixed-4k", p, None));

    let (parent, child) = ours_chain(dir);
    let mut r = Raw::load(&parent);
    for (block, fill) in [(0, 0xa0), (1, 0xa1), (2, 0xa2)] {
        r.allocate(block, fill);
    }
    let parent_guid = r.data_write_guid();
    r.save();
    let mut r = Raw::load(&child);
    r.allocate(1, 0xc1);
    let sb = r.append(MIB, 0);
    // Block 2 (sectors 4096..6143 of chunk 0): every other run of 8 sectors is in the child.
    for byte in (2048 * 2 / 8)..(2048 * 3 / 8) {
        r.b[(sb + byte) as usize] = if byte % 2 == 0 { 0xff } else { 0x0f };
    }
    let cr = r.chunk_ratio();
    r.set_bat(cr, sb | SB_PRESENT);
    let data = r.append(MIB, 0xc2);
    r.set_bat(2, data | PARTIALLY_PRESENT);
    r.set_bat(3, 2);
    r.save();
    // The parent's DataWriteGuid did not change: editing by hand is not a tracked write.
    assert_eq!(Raw::load(&parent).data_write_guid(), parent_guid);
    Chain::open(&child, &ChainOptions::default()).expect("smoke chain opens");
    bases.push(Base::new("ours-differencing", child, Some(parent)));

    for name in ["discutils-btrfs", "discutils-vhdx-log-replay"] {
        let (fx, p) = common::fixture(name);
        bases.push(Base::new(name, p, None));
        keep.push(fx);
    }
    (bases, keep)
}

/// One mutation, applied through the storage with its undo recorded.
#[derive(Debug)]
enum Mutation {
    Flip { at: u64, bit: u8 },
    Byte { at: u64, value: u8 },
    Int { at: u64, width: u8, value: u64 },
    Guid { at: u64, guid: Uuid },
    Truncate { len: u64 },
}

fn interesting(rng: &mut Rng, file_len: u64) -> u64 {
    let aligned = file_len.div_ceil(MIB) * MIB;
    let v = [
        0,
        1,
        2,
        3,
        5,
        6,
        7,
        512,
        4096,
        2047,
        2048,
        65535,
        65536,
        MIB,
        2 * MIB,
        3 * MIB,
        4 * MIB,
        256 * MIB,
        512 * KIB,
        u64::from(u32::MAX),
        1 << 32,
        1 << 63,
        u64::MAX,
        u64::MAX - 1,
        u64::MAX - MIB + 1,
        64 * TIB,
        64 * TIB + 512,
        file_len,
        aligned,
        aligned + MIB,
        file_len.saturating_sub(MIB),
    ];
    match rng.below(4) {
        0 => rng.next(),
        1 => (rng.below(aligned / MIB + 4) * MIB) | rng.below(8),
        _ => *rng.pick(&v),
    }
}

fn random_mutation(rng: &mut Rng, base: &Base, file_len: u64) -> Mutation {
    let total: u64 = base.targets.iter().map(|t| t.2).sum();
    let mut pick = rng.below(total);
    let &(offset, length, _) = base
        .targets
        .iter()
        .find(|t| {
            if pick < t.2 {
                true
            } else {
                pick -= t.2;
                false
            }
        })
        .unwrap();
    let length = length.max(1);
    let at = offset + rng.below(length);
    match rng.below(100) {
        0..=24 => Mutation::Flip {
            at,
            bit: rng.below(8) as u8,
        },
        25..=39 => Mutation::Byte {
            at,
            value: rng.next() as u8,
        },
        40..=89 => {
            let width = *rng.pick(&[2u8, 4, 4, 8, 8, 8]);
            let at = offset + (at - offset) / u64::from(width) * u64::from(width);
            Mutation::Int {
                at,
                width,
                value: interesting(rng, file_len),
            }
        }
        90..=96 => {
            let known = [
                BAT_REGION_GUID,
                METADATA_REGION_GUID,
                FILE_PARAMETERS_GUID,
                VIRTUAL_DISK_SIZE_GUID,
                VIRTUAL_DISK_ID_GUID,
                LOGICAL_SECTOR_SIZE_GUID,
                PARENT_LOCATOR_GUID,
                LOG_GUID,
                Uuid::from_u128(u128::from(rng.next())),
            ];
            // GUIDs sit at the start of 32-byte table entries (after a 16- or 32-byte header).
            let at = offset + (at - offset) / 16 * 16;
            Mutation::Guid {
                at,
                guid: *rng.pick(&known),
            }
        }
        _ => Mutation::Truncate {
            len: match rng.below(4) {
                0 => rng.below(MIB),
                1 => rng.below(file_len),
                _ => rng.below(file_len / MIB + 1) * MIB,
            },
        },
    }
}

/// Applies mutations to a `MemStorage` and undoes them afterwards, so a 70 MiB base is never
/// copied per iteration.
struct Mutator<'a> {
    storage: &'a MemStorage,
    undo: Vec<(u64, Vec<u8>)>,
    truncated_from: Option<u64>,
}

impl Mutator<'_> {
    fn write(&mut self, at: u64, bytes: &[u8]) {
        let len = self.storage.len().unwrap();
        if at >= len {
            return;
        }
        let bytes = &bytes[..bytes.len().min((len - at) as usize)];
        let mut old = vec![0u8; bytes.len()];
        self.storage.read_at(&mut old, at).unwrap();
        self.undo.push((at, old));
        self.storage.write_at(bytes, at).unwrap();
    }

    fn read(&self, at: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        self.storage.read_at(&mut buf, at).unwrap();
        buf
    }

    fn apply(&mut self, m: &Mutation) {
        match *m {
            Mutation::Flip { at, bit } => {
                let b = self.read(at, 1)[0] ^ (1 << bit);
                self.write(at, &[b]);
            }
            Mutation::Byte { at, value } => self.write(at, &[value]),
            Mutation::Int { at, width, value } => {
                self.write(at, &value.to_le_bytes()[..usize::from(width)])
            }
            Mutation::Guid { at, guid } => self.write(at, &guid.to_bytes_le()),
            Mutation::Truncate { len } => {
                let old = self.storage.len().unwrap();
                if len < old && self.truncated_from.is_none() {
                    self.truncated_from = Some(old);
                    self.storage.set_len(len).unwrap();
                }
            }
        }
    }

    /// Re-stamps the checksum of a structure of `len` bytes at `at`.
    fn restamp(&mut self, at: u64, len: u64) {
        let mut buf = self.read(at, len);
        stamp_crc(&mut buf, 4);
        self.write(at + 4, &buf[4..8]);
    }

    fn undo(&mut self, pristine: &[u8]) {
        if let Some(old) = self.truncated_from.take() {
            let now = self.storage.len().unwrap();
            self.storage.set_len(old).unwrap();
            self.storage
                .write_at(&pristine[now as usize..old as usize], now)
                .unwrap();
        }
        for (at, old) in self.undo.drain(..).rev() {
            self.storage.write_at(&old, at).unwrap();
        }
    }
}

/// What one open of a mutated file came to, for the statistics: the error variant (and the
/// variant of its cause), without the details.
fn outcome_kind(e: &Error) -> String {
    fn variant(debug: String) -> String {
        let end = debug
            .find(|c: char| !c.is_alphanumeric())
            .unwrap_or(debug.len());
        debug[..end].to_string()
    }
    match e {
        Error::Corrupt(c) => format!("Corrupt::{}", variant(format!("{c:?}"))),
        Error::Unsupported(m) => {
            let words: Vec<&str> = m.split(' ').take(3).collect();
            format!("Unsupported: {}", words.join(" "))
        }
        Error::Chain(ChainError::Open { source, .. }) => {
            format!("Chain::Open > {}", outcome_kind(source))
        }
        Error::Chain(c) => format!("Chain::{}", variant(format!("{c:?}"))),
        other => variant(format!("{other:?}")),
    }
}

/// Reads a few ranges of an opened chain, checking the invariants of every extent.
fn read_some(chain: &Chain, rng: &mut Rng) -> vhost_user_vhdx::vhdx::Result<()> {
    let vs = chain.virtual_size();
    let lss = u64::from(chain.logical_sector_size());
    let block = u64::from(chain.leaf().metadata.block_size);
    let len = (64 * KIB).min(vs) / lss * lss;
    let random = rng.below(vs / lss) * lss;
    let mut starts = vec![0, vs - len, random.min(vs - len)];
    if block < vs {
        // Across the boundary between the first two blocks.
        starts.push((block - len / 2) / lss * lss);
    }
    let mut buf = vec![0u8; len as usize];
    for start in starts {
        chain.read_at(&mut buf, start)?;
    }
    Ok(())
}

/// The first and last 4 KiB of each of the first 64 blocks of a disk.
fn sample(chain: &Chain) -> vhost_user_vhdx::vhdx::Result<Vec<u8>> {
    let vs = chain.virtual_size();
    let block = u64::from(chain.leaf().metadata.block_size);
    let lss = u64::from(chain.logical_sector_size());
    let len = 4096u64.min(vs) / lss * lss;
    let mut out = Vec::new();
    for b in 0..vs.div_ceil(block).min(64) {
        let last = ((b + 1) * block).min(vs) - len;
        for at in [(b * block).min(vs - len), last] {
            let mut buf = vec![0u8; len as usize];
            chain.read_at(&mut buf, at)?;
            out.extend_from_slice(&buf);
        }
    }
    Ok(out)
}

/// Opens a mutated base (read-only, in memory) and reads it; `Ok(kind)` says what happened.
fn exercise(
    base: &Base,
    storage: Arc<MemStorage>,
    rng: &mut Rng,
) -> vhost_user_vhdx::vhdx::Result<()> {
    let file = VhdxFile::open_storage(storage, base.path.clone(), false)?;
    let vs = file.virtual_size();
    // Map the whole disk: the runs cover it exactly and never point into the header section.
    let mut total = 0u64;
    let mut bad_source = None;
    file.map(0, vs, &mut |s, l| {
        total += l;
        if let Source::Data(at) = s {
            if at < MIB {
                bad_source = Some(at);
            }
        }
    })?;
    assert_eq!(total, vs, "map must cover the whole disk");
    assert_eq!(bad_source, None, "a run points into the header section");
    let layers = match (&base.parent, file.is_differencing()) {
        (Some(parent), true) => vec![file, VhdxFile::open(parent, false)?],
        _ => vec![file],
    };
    let chain = Chain::from_layers(layers)?;
    read_some(&chain, rng)
}

/// A storage that refuses to grow past a limit, for writable opens of mutated files (a hostile
/// LastFileOffset may ask for terabytes).
struct Bounded(std::sync::Mutex<Vec<u8>>);

impl Storage for Bounded {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let d = self.0.lock().unwrap();
        let start = offset.min(d.len() as u64) as usize;
        let n = buf.len().min(d.len() - start);
        buf[..n].copy_from_slice(&d[start..start + n]);
        buf[n..].fill(0);
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if end > 256 * MIB {
            return Err(std::io::Error::other("bounded storage"));
        }
        let mut d = self.0.lock().unwrap();
        if d.len() < end as usize {
            d.resize(end as usize, 0);
        }
        d[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.0.lock().unwrap().len() as u64)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if len > 256 * MIB {
            return Err(std::io::Error::other("bounded storage"));
        }
        self.0.lock().unwrap().resize(len as usize, 0);
        Ok(())
    }
}

/// Mutations per base and the seed; `VHDX_SMOKE_ITERATIONS` and `VHDX_SMOKE_SEED` (hex)
/// override them for a longer hunt or to replay a reported seed (`seed = SMOKE_SEED ^ (base <<
/// 48) ^ iteration`).
const SMOKE_ITERATIONS: u64 = 2500;
const SMOKE_SEED: u64 = 0x5eed_f00d_4d15_c0de;

fn smoke_setting(var: &str, default: u64, radix: u32) -> u64 {
    match std::env::var(var) {
        Ok(v) => u64::from_str_radix(v.trim_start_matches("0x"), radix)
            .unwrap_or_else(|e| panic!("{var}={v}: {e}")),
        Err(_) => default,
    }
}

#[test]
fn mutation_smoke() {
    use std::collections::BTreeMap;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    let iterations = smoke_setting("VHDX_SMOKE_ITERATIONS", SMOKE_ITERATIONS, 10);
    let smoke_seed = smoke_setting("VHDX_SMOKE_SEED", SMOKE_SEED, 16);
    let d = dir();
    let (bases, _keep) = smoke_bases(d.path());

    // Watchdog: a hang aborts the process after saying which mutation caused it.
    let progress = Arc::new(AtomicU64::new(0));
    let current = Arc::new(Mutex::new(String::new()));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (progress, current, done) = (progress.clone(), current.clone(), done.clone());
        std::thread::spawn(move || {
            let mut last = (u64::MAX, Instant::now());
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let now = progress.load(Ordering::Relaxed);
                if now != last.0 {
                    last = (now, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(30) {
                    eprintln!(
                        "mutation_smoke: no progress for 30 s (a hang) at {}",
                        current.lock().unwrap()
                    );
                    std::process::abort();
                }
            }
        })
    };

    let started = Instant::now();
    let mut failures: Vec<String> = Vec::new();
    let mut stats: BTreeMap<String, u64> = BTreeMap::new();
    for (b, base) in bases.iter().enumerate() {
        let storage = Arc::new(MemStorage::new(base.bytes.clone()));
        let mutant_path = base
            .path
            .with_file_name(format!("mutant-{}.vhdx", base.name));
        for i in 0..iterations {
            let seed = smoke_seed ^ ((b as u64) << 48) ^ i;
            let mut rng = Rng(seed);
            let file_len = base.bytes.len() as u64;
            let mut mutations: Vec<Mutation> = (0..1 + rng.below(4))
                .map(|_| random_mutation(&mut rng, base, file_len))
                .collect();
            // Truncation last, so that the other mutations land inside the file.
            mutations.sort_by_key(|m| matches!(m, Mutation::Truncate { .. }));
            let restamp_headers = rng.chance(75);
            let restamp_regions = rng.chance(75);
            let restamp_log = rng.chance(75);
            let what = format!(
                "base {} iteration {i} seed {seed:#x}: {mutations:?} (re-stamp headers \
                 {restamp_headers}, regions {restamp_regions}, log {restamp_log})",
                base.name
            );
            *current.lock().unwrap() = what.clone();

            let mut m = Mutator {
                storage: &storage,
                undo: Vec::new(),
                truncated_from: None,
            };
            let (truncations, edits): (Vec<_>, Vec<_>) = mutations
                .iter()
                .partition(|m| matches!(m, Mutation::Truncate { .. }));
            for mutation in edits {
                m.apply(mutation);
            }
            if restamp_headers {
                for h in HEADER_OFFSETS {
                    m.restamp(h, HEADER_LEN);
                }
            }
            if restamp_regions {
                for t in REGION_TABLE_OFFSETS {
                    m.restamp(t, REGION_TABLE_LEN);
                }
            }
            if let (true, Some((at, _))) = (restamp_log, base.log_entry) {
                let len = u64::from(u32::from_le_bytes(m.read(at + 8, 4).try_into().unwrap()));
                if len > 0 && len % 4096 == 0 && len <= MIB {
                    m.restamp(at, len);
                }
            }
            for mutation in truncations {
                m.apply(mutation);
            }
            let mutated_len = storage.len().unwrap();

            let result = catch_unwind(AssertUnwindSafe(|| {
                let (r, peak) = peak_alloc(|| exercise(base, storage.clone(), &mut rng));
                let limit = (mutated_len as usize).max(ALLOC_LIMIT);
                assert!(
                    peak <= limit,
                    "one allocation of {peak} bytes for a {mutated_len}-byte file"
                );
                let mut kinds = vec![match &r {
                    Ok(()) => "Ok".to_string(),
                    Err(e) => {
                        let _ = e.to_string();
                        outcome_kind(e)
                    }
                }];
                // A writable open replays a (possibly hostile) log into a bounded copy; when
                // both opens work, it must show the same disk as the in-memory replay.
                if base.log_entry.is_some() && i % 8 == 0 {
                    let copy = Arc::new(Bounded(Mutex::new(storage.snapshot())));
                    let rw = VhdxFile::open_storage(copy, base.path.clone(), true)
                        .and_then(|f| sample(&Chain::from_layers(vec![f])?));
                    let ro = VhdxFile::open_storage(storage.clone(), base.path.clone(), false)
                        .and_then(|f| sample(&Chain::from_layers(vec![f])?));
                    if let (Ok(rw), Ok(ro)) = (&rw, &ro) {
                        assert!(rw == ro, "the read-only and the writable replay differ");
                        kinds.push("replays agree".into());
                    }
                }
                // Now and then, from disk: the chain through the locator, and `check` (with
                // repairs every other time, which may replay the log and truncate the file).
                if mutated_len <= 32 * MIB && i % 25 == 0 {
                    std::fs::write(&mutant_path, storage.snapshot()).unwrap();
                    match Chain::open(&mutant_path, &ChainOptions::default()) {
                        Ok(chain) => {
                            read_some(&chain, &mut rng).ok();
                        }
                        Err(e) => kinds.push(format!("from disk: {}", outcome_kind(&e))),
                    }
                    let repair = if i % 50 == 0 {
                        Repair::All
                    } else {
                        Repair::None
                    };
                    check(&mutant_path, repair, &[]);
                }
                kinds
            }));
            match result {
                Ok(kinds) => {
                    for k in kinds {
                        *stats.entry(k).or_default() += 1;
                    }
                    m.undo(&base.bytes);
                }
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{what}\n    panicked: {msg}"));
                    m.undo.clear();
                    m.truncated_from = None;
                    storage.set_len(0).unwrap();
                    storage.write_at(&base.bytes, 0).unwrap();
                }
            }
            progress.fetch_add(1, Ordering::Relaxed);
        }
        assert!(
            storage.snapshot() == base.bytes,
            "{}: undoing the mutations did not restore the file",
            base.name
        );
    }
    done.store(true, Ordering::Relaxed);
    watchdog.join().unwrap();

    eprintln!(
        "mutation_smoke: {} files x {iterations} mutations (seed {smoke_seed:#x}) in {:.1} s",
        bases.len(),
        started.elapsed().as_secs_f64()
    );
    for (k, n) in &stats {
        eprintln!("  {n:6}  {k}");
    }
    assert!(
        failures.is_empty(),
        "{} mutations panicked; the first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(10)].join("\n")
    );
    // The re-stamped checksums let mutations reach the deeper structures.
    let opened = stats.get("Ok").copied().unwrap_or(0);
    assert!(opened > 0, "no mutated file opened: {stats:?}");
    let deep = stats
        .keys()
        .filter(|k| !k.contains("NoValidHeader") && !k.contains("NoValidRegionTable"))
        .count();
    assert!(deep >= 15, "too few kinds of outcome: {stats:?}");
}
