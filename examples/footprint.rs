//! Footprint figures for the benchmark (contrib/bench): not a test, it only measures.
//!
//!   footprint open-64t DIR     time to open a 64 TiB sparse dynamic VHDX (32 MiB blocks)
//!   footprint replay-1m DIR    time to open a file whose 1 MiB log is full of entries to replay
//!
//! Each prints one line `name: value unit`.

use std::path::Path;
use std::time::Instant;

use uuid::Uuid;
use vhost_user_vhdx::vhdx::create::{self, CreateOptions};
use vhost_user_vhdx::vhdx::format::{guid_to_disk, stamp_checksum, HEADER_OFFSETS, MIB, TIB};
use vhost_user_vhdx::vhdx::header::read_headers;
use vhost_user_vhdx::vhdx::log::entry::build_entry;
use vhost_user_vhdx::vhdx::log::LogOp;
use vhost_user_vhdx::vhdx::{Storage, VhdxFile};

fn open_64t(dir: &Path) {
    let path = dir.join("64t.vhdx");
    let _ = std::fs::remove_file(&path);
    create::create(
        &path,
        &CreateOptions {
            virtual_size: Some(64 * TIB),
            block_size: Some(32 * MIB as u32),
            ..Default::default()
        },
    )
    .unwrap();
    // Best of five: the first open also pays for reading the BAT into the page cache.
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let f = VhdxFile::open(&path, false).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
        assert_eq!(f.virtual_size(), 64 * TIB);
    }
    println!("open a 64 TiB sparse VHDX: {:.1} ms", best * 1000.0);
}

/// A file whose 1 MiB log holds a complete sequence of entries that fill it, each rewriting
/// BAT pages, with LogGuid set: the open must replay all of it.
fn replay_1m(dir: &Path) {
    let path = dir.join("replay.vhdx");
    let _ = std::fs::remove_file(&path);
    create::create(
        &path,
        &CreateOptions {
            virtual_size: Some(128 * 1024 * MIB),
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let headers = read_headers(&file).unwrap();
    let h = headers.current;
    let f = VhdxFile::open(&path, false).unwrap();
    let bat = f.regions.bat();
    drop(f);
    let log_guid = Uuid::new_v4();
    let size = Storage::len(&file).unwrap();
    // Two entries of 126 data sectors and one descriptor sector each (127 sectors), then a
    // third of the rest: 254 + 2 = 256 sectors = the whole 1 MiB log.
    let mut position = 0u64;
    let mut page = 0u64;
    let sizes = [126u64, 126, 0];
    let mut tail = 0;
    for (i, n) in sizes.iter().enumerate() {
        let ops: Vec<LogOp> = (0..*n)
            .map(|_| {
                // NOT_PRESENT entries: valid whatever the file's size.
                let data = Box::new([0u8; 4096]);
                let op = LogOp::Data {
                    file_offset: bat.file_offset + page * 4096,
                    data,
                };
                page += 1;
                op
            })
            .collect();
        if i == 0 {
            tail = position;
        }
        let entry = build_entry(log_guid, 10 + i as u64, tail, size, size, &ops);
        Storage::write_at(&file, &entry, h.log_offset + position).unwrap();
        position += entry.len() as u64;
    }
    // Set LogGuid in the current header, as a writer that crashed would have left it.
    let mut header = h.to_bytes();
    header[48..64].copy_from_slice(&guid_to_disk(log_guid));
    stamp_checksum(&mut header[..], 4);
    Storage::write_at(&file, &header[..], HEADER_OFFSETS[headers.current_slot]).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let copy = dir.join("replay-copy.vhdx");
    let mut best = f64::MAX;
    for _ in 0..5 {
        std::fs::copy(&path, &copy).unwrap();
        let t = Instant::now();
        let f = VhdxFile::open(&copy, true).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
        assert!(matches!(
            f.log_state,
            vhost_user_vhdx::vhdx::LogState::Replayed { entries: 3 }
        ));
    }
    println!(
        "replay a full 1 MiB log ({position} bytes, {page} pages): {:.1} ms",
        best * 1000.0
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(args.get(2).map(String::as_str).unwrap_or("/tmp"));
    match args.get(1).map(String::as_str) {
        Some("open-64t") => open_64t(dir),
        Some("replay-1m") => replay_1m(dir),
        _ => eprintln!("usage: footprint open-64t|replay-1m DIR"),
    }
}
