//! Errors of the VHDX engine.
//!
//! Every way a file can be damaged or hostile has its own [`Corruption`] variant that names the
//! structure and, where there is one, the file offset, so that a user's bug report says exactly
//! what is wrong with the file. Everything else (I/O, unsupported features, chain problems, bad
//! arguments) has its own [`Error`] variant.

use std::io;
use std::path::PathBuf;

use uuid::Uuid;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("corrupt VHDX: {0}")]
    Corrupt(#[from] Corruption),
    #[error("unsupported VHDX: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Chain(#[from] ChainError),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("the image is open read-only")]
    ReadOnly,
    #[error("{0}")]
    Locked(String),
    #[error(
        "the image is unusable after an earlier I/O error ({0}); nothing more is written to it"
    )]
    Poisoned(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The corruption behind this error, if it is one.
    pub fn corruption(&self) -> Option<&Corruption> {
        match self {
            Error::Corrupt(c) => Some(c),
            _ => None,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { source, .. } => source,
            Error::ReadOnly => io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()),
            Error::InvalidArgument(_) => io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
            other => io::Error::other(other.to_string()),
        }
    }
}

/// A precise reason why a file is not a valid VHDX.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    #[error("file is {size} bytes, too small to hold the 1 MiB VHDX header section")]
    FileTooSmall { size: u64 },
    #[error("no \"vhdxfile\" signature at offset 0")]
    BadFileSignature,
    #[error(
        "neither header is valid (header 1 at 0x10000: {first}; header 2 at 0x20000: {second})"
    )]
    NoValidHeader { first: String, second: String },
    #[error("both headers are valid with the same sequence number {sequence} but differ")]
    HeaderSequenceTie { sequence: u64 },
    #[error("header at {offset:#x}: {field} {value:#x} is not a multiple of 1 MiB")]
    HeaderMisaligned {
        offset: u64,
        field: &'static str,
        value: u64,
    },
    #[error("header sequence number {0:#x} cannot be incremented")]
    HeaderSequenceOverflow(u64),
    #[error(
        "neither region table is valid (table 1 at 0x30000: {first}; table 2 at 0x40000: {second})"
    )]
    NoValidRegionTable { first: String, second: String },
    #[error("region table at {offset:#x}: entry count {count} exceeds 2047")]
    RegionTableTooManyEntries { offset: u64, count: u32 },
    #[error("region table: region {guid} appears more than once")]
    DuplicateRegion { guid: Uuid },
    #[error("region table: required region {0} (BAT or metadata) is missing")]
    MissingRegion(&'static str),
    #[error("region {guid}: offset {offset:#x} length {length:#x} is not 1 MiB-aligned or starts inside the header section")]
    RegionMisaligned {
        guid: Uuid,
        offset: u64,
        length: u64,
    },
    #[error(
        "{what} at {offset:#x} length {length:#x} ends beyond the end of the file ({file_size:#x})"
    )]
    BeyondEndOfFile {
        what: String,
        offset: u64,
        length: u64,
        file_size: u64,
    },
    #[error("{a} overlaps {b}")]
    Overlap { a: String, b: String },
    #[error("metadata table at {offset:#x}: bad signature")]
    BadMetadataSignature { offset: u64 },
    #[error("metadata table at {offset:#x}: entry count {count} exceeds 2047")]
    MetadataTooManyEntries { offset: u64, count: u16 },
    #[error("metadata table: more than 1024 user metadata entries")]
    TooManyUserMetadata,
    #[error("metadata item {item}: offset {offset:#x} length {length:#x} is outside the metadata region (length {region_length:#x})")]
    MetadataItemOutOfRegion {
        item: Uuid,
        offset: u32,
        length: u32,
        region_length: u64,
    },
    #[error("metadata item {0} appears more than once")]
    DuplicateMetadataItem(Uuid),
    #[error("required metadata item {0} is missing")]
    MissingMetadataItem(&'static str),
    #[error("metadata item {item}: length {length} is wrong, expected {expected}")]
    MetadataItemLength {
        item: &'static str,
        length: u32,
        expected: u32,
    },
    #[error("block size {0} is not a power of two between 1 MiB and 256 MiB")]
    BadBlockSize(u32),
    #[error("{which} sector size {size} is neither 512 nor 4096")]
    BadSectorSize { which: &'static str, size: u32 },
    #[error("virtual disk size {size} is zero, above 64 TiB, or not a multiple of the logical sector size {sector_size}")]
    BadVirtualDiskSize { size: u64, sector_size: u32 },
    #[error("file parameters: reserved flag bits {0:#x} are set")]
    FileParameterReservedBits(u32),
    #[error("differencing file (HasParent) without a parent locator")]
    MissingParentLocator,
    #[error("parent locator present in a file without HasParent")]
    UnexpectedParentLocator,
    #[error("parent locator: {0}")]
    BadParentLocator(String),
    #[error(
        "BAT region length {region_length:#x} is smaller than the {entries} entries the disk needs"
    )]
    BatTooSmall { region_length: u64, entries: u64 },
    #[error("BAT entry {index} ({entry:#x}): state {state} is not valid for {context}")]
    BadBlockState {
        index: u64,
        entry: u64,
        state: u8,
        context: &'static str,
    },
    #[error("BAT entry {index} ({entry:#x}): block at {offset:#x} {reason}")]
    BadBlockOffset {
        index: u64,
        entry: u64,
        offset: u64,
        reason: String,
    },
    #[error("BAT entries {first} and {second} both point at file offset {offset:#x}")]
    DuplicateBlockOffset {
        first: u64,
        second: u64,
        offset: u64,
    },
    #[error("BAT entry {index}: PARTIALLY_PRESENT block in chunk {chunk} whose sector bitmap block is not present")]
    MissingSectorBitmap { index: u64, chunk: u64 },
    #[error("log at {offset:#x} length {length:#x} is not 1 MiB-aligned or lies inside the header section")]
    BadLogLocation { offset: u64, length: u64 },
    #[error("log: LogGuid is set but no valid log sequence was found")]
    NoValidLogSequence,
    #[error("log: the file ({file_size:#x} bytes) is shorter than the log's FlushedFileOffset {flushed:#x}: it was truncated")]
    LogFileTruncated { file_size: u64, flushed: u64 },
    #[error("log entry at log offset {offset:#x}: {reason}")]
    BadLogEntry { offset: u64, reason: String },
}

/// Why a differencing chain could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("parent of {child} not found; tried: {tried}")]
    ParentNotFound { child: PathBuf, tried: String },
    #[error("parent {parent} of {child} has DataWriteGuid {found}, but the child expects {expected}: the parent was modified or is the wrong file")]
    LinkageMismatch {
        child: PathBuf,
        parent: PathBuf,
        expected: String,
        found: Uuid,
    },
    #[error("parent {parent} has logical sector size {parent_size}, but its child {child} has {child_size}")]
    SectorSizeMismatch {
        child: PathBuf,
        parent: PathBuf,
        child_size: u32,
        parent_size: u32,
    },
    #[error(
        "parent {parent} has virtual size {parent_size}, but its child {child} has {child_size}"
    )]
    VirtualSizeMismatch {
        child: PathBuf,
        parent: PathBuf,
        child_size: u64,
        parent_size: u64,
    },
    #[error("differencing chain loops: {0} appears twice")]
    Loop(PathBuf),
    #[error("differencing chain is deeper than {0} files")]
    TooDeep(usize),
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<Error>,
    },
}
