//! The VHDX write-ahead log ([MS-VHDX] §2.3): the on-disk entry format, finding and replaying
//! the active sequence on open.
//!
//! Every metadata change except the headers goes through the log, so that a crash at any instant
//! leaves a file that replay brings back to a consistent state.

pub mod entry;
pub mod replay;
pub mod writer;

pub use entry::{LogEntry, LogOp};
pub use replay::{find_active_sequence, ReplayPlan};
