//! Opening an image from bytes: headers, region table, metadata, parent locator, BAT and log
//! replay; then reading every block (up to a bound) and running `check`. The input is a
//! [`crate::sparse`] image; when the top bit of its length is set, the checksums of both
//! headers and both region tables are made right first, so that mutations of their fields get
//! past the CRC-32C (which random changes almost never do).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use vhost_user_vhdx::vhdx::format::checksum_with_field_zeroed;
use vhost_user_vhdx::vhdx::{check, Chain, Storage, VhdxFile};

use crate::sparse;
use crate::storage::{Capped, Pages};

/// Reads at most this much of the virtual disk per open (a hostile size may be 64 TiB).
const READ_LIMIT: u64 = 8 << 20;

/// Headers (4 KiB) at 64 and 128 KiB, region tables (64 KiB) at 192 and 256 KiB; each has
/// its CRC-32C at byte 4.
fn fix_checksums(image: &mut Pages) {
    for (at, len) in [(64, 4), (128, 4), (192, 64), (256, 64)] {
        let (at, len) = (at << 10, len << 10);
        if image.size() >= at + len {
            let mut buf = vec![0u8; len as usize];
            image.read(&mut buf, at);
            let crc = checksum_with_field_zeroed(&buf, 4);
            image.write(&crc.to_le_bytes(), at + 4);
        }
    }
}

pub fn run(data: &[u8]) {
    let mut image = sparse::decode_pages(data);
    if data.len() >= 4 && data[3] & 0x80 != 0 {
        fix_checksums(&mut image);
    }
    let path = PathBuf::from("/fuzz/image.vhdx");
    // Read-only: a dirty log is replayed in memory.
    let storage: Arc<dyn Storage> = Arc::new(Capped::from_pages(image.clone()));
    match VhdxFile::open_storage(storage, path.clone(), false) {
        Ok(file) => read_and_check(file),
        Err(e) => {
            black_box(e.to_string());
        }
    }
    // Writable: the log is replayed into the file, which must then open clean again.
    let storage = Arc::new(Capped::from_pages(image));
    if let Ok(file) = VhdxFile::open_storage(storage.clone(), path.clone(), true) {
        black_box(file.close().is_ok());
        if let Ok(again) = VhdxFile::open_storage(storage, path, false) {
            read_and_check(again);
        }
    }
}

fn read_and_check(file: VhdxFile) {
    let report = check::check_file(&file);
    black_box(report.corruptions.len());
    let Ok(chain) = Chain::from_layers(vec![file]) else {
        return;
    };
    let size = chain.virtual_size();
    let block = u64::from(chain.leaf().geometry().block_size).max(1);
    let lss = u64::from(chain.logical_sector_size()).max(1);
    // The first sectors of every block, up to the limit, then one read across two blocks.
    let piece = (READ_LIMIT / 64).min(block) / lss * lss;
    let mut buf = vec![0u8; piece as usize];
    let mut done = 0;
    let mut offset = 0;
    while offset < size && done < READ_LIMIT && piece > 0 {
        let n = piece.min(size - offset) / lss * lss;
        if n == 0 {
            break;
        }
        black_box(chain.read_at(&mut buf[..n as usize], offset).is_ok());
        done += n;
        offset = offset.saturating_add(block);
    }
    if size >= 2 * block && block <= READ_LIMIT / 2 {
        let mut buf = vec![0u8; (2 * lss) as usize];
        black_box(chain.read_at(&mut buf, block - lss).is_ok());
    }
}
