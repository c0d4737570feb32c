//! The log alone: entry parsing at every sector, the search for the active sequence, and
//! applying its plan to a file.
//!
//! Input: a LogGuid (16 bytes), a file size (8 bytes LE), then the log (cut or zero-padded to
//! a multiple of 4 KiB, at most 1 MiB). The file is the log followed by zeros, so that replay
//! targets inside and outside the log both occur.

use std::hint::black_box;

use uuid::Uuid;
use vhost_user_vhdx::vhdx::log::entry::parse_entry;
use vhost_user_vhdx::vhdx::log::replay::{apply, find_active_sequence};
use vhost_user_vhdx::vhdx::Storage;

use crate::storage::{Capped, Pages};

const MAX_LOG: usize = 1 << 20;
/// Where the log sits in the file (as in files we create).
const LOG_OFFSET: u64 = 1 << 20;

pub fn run(data: &[u8]) {
    if data.len() < 24 {
        return;
    }
    let guid = Uuid::from_bytes_le(data[..16].try_into().unwrap());
    let file_size = u64::from_le_bytes(data[16..24].try_into().unwrap());
    let mut log = data[24..data.len().min(24 + MAX_LOG)].to_vec();
    log.resize(log.len().div_ceil(4096).max(1) * 4096, 0);
    for pos in (0..log.len() as u64).step_by(4096) {
        if let Ok(e) = parse_entry(&log, pos, guid) {
            black_box(e.sequence_number);
        }
    }
    let storage = Capped::from_pages(Pages::zeros(LOG_OFFSET));
    if storage.write_at(&log, LOG_OFFSET).is_err() {
        return;
    }
    let len = storage.len().unwrap();
    let plan = find_active_sequence(
        &storage,
        LOG_OFFSET,
        log.len() as u64,
        guid,
        file_size % (2 * len + 1),
    );
    if let Ok(plan) = plan {
        black_box(apply(&storage, &plan).is_ok());
    }
}
