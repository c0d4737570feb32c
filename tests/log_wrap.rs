//! A session long enough to wrap the log several times, left dirty (no clean close): qemu's
//! replay (`qemu-img check -r all`) and ours must both recover it, to the same disk.
//!
//! qemu's log search accepts any valid entry as the second entry of a sequence and replays
//! until its write pointer; a log filled all the way round with entries of one session used to
//! make it chain from the newest entry into the oldest and fail the open with EINVAL.

mod common;

use vhost_user_vhdx::vhdx::create::{self, CreateOptions};

const MIB: u64 = 1 << 20;

fn wrap_case(entries: u64) {
    let dir = common::tempdir("log-wrap-");
    let img = dir.path().join("a.vhdx");
    create::create(
        &img,
        &CreateOptions {
            virtual_size: Some(512 * MIB),
            block_size: Some(MIB as u32),
            ..Default::default()
        },
    )
    .unwrap();
    let chain = common::open_writable(&img);
    // Every write allocates a block, every flush commits one small log entry.
    for i in 0..entries {
        chain
            .write_at(&[(i % 250) as u8 + 1; 4096], i * MIB)
            .unwrap();
        chain.flush().unwrap();
    }
    // Abandoned: the log still names the session.
    drop(chain);
    let ours = dir.path().join("ours.raw");
    let qemu = dir.path().join("qemu.raw");
    let copy = dir.path().join("q.vhdx");
    std::fs::copy(&img, &copy).unwrap();
    common::qemu_img_ok(&["check", "-r", "all", "-f", "vhdx", common::s(&copy)]);
    common::qemu_img_convert_raw(&copy, &qemu);
    common::ours_ok(&["convert", "-O", "raw", common::s(&img), common::s(&ours)]);
    common::files_equal(&ours, &qemu).unwrap();
    for i in 0..entries {
        let got = common::read_at(&ours, i * MIB, 4096);
        assert!(got.iter().all(|&b| b == (i % 250) as u8 + 1), "block {i}");
    }
}

/// 129 writes make entries 2..=130 after the session's first (empty) entry: each takes two
/// sectors of the 256 in a 1 MiB log, so entry 129 wraps around the end and entry 130, the
/// newest, is the first valid entry qemu's search meets from the start of the log.
#[test]
fn the_entry_after_one_that_wraps_is_replayed_by_qemu_and_by_us() {
    wrap_case(129);
}

#[test]
fn a_log_wrapped_once_is_replayed_by_qemu_and_by_us() {
    wrap_case(140);
}

#[test]
fn a_log_wrapped_several_times_is_replayed_by_qemu_and_by_us() {
    wrap_case(400);
}
