//! The VHDX engine: pure Rust, no virtio knowledge, no `unsafe`.
//!
//! One module per on-disk concept, named as in [MS-VHDX]: `format` (structures and constants),
//! `header`, `region`, `metadata`, `locator`, `bat`, `bitmap`, `log`; then `file` (one open file),
//! `chain` (a leaf and its parents), `create` and `check`; `commit` and `rebase` change chains.
#![forbid(unsafe_code)]

pub mod bat;
pub mod bitmap;
pub mod buffers;
pub mod chain;
pub mod check;
pub mod commit;
pub mod compact;
pub mod create;
pub mod direct;
pub mod error;
pub mod file;
pub mod format;
pub mod header;
pub mod locator;
pub mod lock;
pub mod log;
pub mod metadata;
pub mod rebase;
pub mod region;
pub mod resize;
pub mod space;
pub mod storage;
pub mod txn;
pub mod write;

pub use buffers::{ReadTarget, WriteSource, Zeros};
pub use chain::{Chain, ChainOptions, Extent, Extents, ReadSource};
pub use error::{ChainError, Corruption, Error, Result};
pub use file::{DataWriteGuid, LogState, Source, VhdxFile};
pub use format::PayloadBlockState;
pub use storage::{MemStorage, Storage};
pub use write::{WriteGuard, WritePlan};
