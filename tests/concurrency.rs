//! Concurrent writers, as the backend's queue threads are: several threads writing disjoint
//! sectors of the same unallocated blocks at once must allocate each block exactly once, and
//! every byte must land. Run on dynamic and differencing files.

mod common;

use std::sync::{Arc, Barrier};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use vhost_user_vhdx::vhdx::check;
use vhost_user_vhdx::vhdx::create::{self, CreateOptions};
use vhost_user_vhdx::vhdx::{Chain, PayloadBlockState};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = MIB;
const BLOCKS: u64 = 16;
const THREADS: usize = 4;
const SECTOR: u64 = 512;

fn run(differencing: bool) {
    let dir = common::tempdir("concurrency-");
    let leaf = dir.path().join("leaf.vhdx");
    let opts = CreateOptions {
        virtual_size: Some(BLOCKS * BLOCK),
        block_size: Some(BLOCK as u32),
        ..Default::default()
    };
    if differencing {
        let base = dir.path().join("base.vhdx");
        create::create(&base, &opts).unwrap();
        let c = common::open_writable(&base);
        c.write_at(&vec![0xbb; (BLOCKS * BLOCK) as usize], 0)
            .unwrap();
        c.close().unwrap();
        create::create(
            &leaf,
            &CreateOptions {
                parent: Some(base),
                ..Default::default()
            },
        )
        .unwrap();
    } else {
        create::create(&leaf, &opts).unwrap();
    }
    let chain = Arc::new(common::open_writable(&leaf));
    // Every sector of the disk goes to one thread; each thread writes its sectors in a random
    // order, in bursts started together so that first touches of a block collide.
    let sectors = BLOCKS * BLOCK / SECTOR;
    let mut order: Vec<u64> = (0..sectors).collect();
    order.shuffle(&mut StdRng::seed_from_u64(7));
    let per_thread: Vec<Vec<u64>> = (0..THREADS)
        .map(|t| {
            order
                .iter()
                .copied()
                .skip(t)
                .step_by(THREADS)
                .take(2000)
                .collect()
        })
        .collect();
    let barrier = Arc::new(Barrier::new(THREADS));
    std::thread::scope(|s| {
        for (t, mine) in per_thread.iter().enumerate() {
            let chain = Arc::clone(&chain);
            let barrier = Arc::clone(&barrier);
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(t as u64);
                for burst in mine.chunks(50) {
                    barrier.wait();
                    for &sector in burst {
                        let buf = vec![(sector % 251) as u8 | 1; SECTOR as usize];
                        chain.write_at(&buf, sector * SECTOR).unwrap();
                        if rng.gen_ratio(1, 200) {
                            chain.flush().unwrap();
                        }
                    }
                }
            });
        }
    });
    let written: std::collections::HashSet<u64> = per_thread.iter().flatten().copied().collect();
    let check_content = |chain: &Chain| {
        let mut disk = vec![0u8; (BLOCKS * BLOCK) as usize];
        chain.read_at(&mut disk, 0).unwrap();
        for (i, got) in disk.chunks(SECTOR as usize).enumerate() {
            let s = i as u64;
            let want = if written.contains(&s) {
                (s % 251) as u8 | 1
            } else if differencing {
                0xbb
            } else {
                0
            };
            assert!(
                got.iter().all(|&b| b == want),
                "sector {s}: {:#x} instead of {want:#x}",
                got[0]
            );
        }
    };
    check_content(&chain);
    Arc::try_unwrap(chain).ok().unwrap().close().unwrap();

    // Each block was allocated once: no two entries share space (the open checks that), and
    // the file holds no more data blocks than the disk has.
    let chain = common::open_writable(&leaf);
    let states = chain.leaf().bat.state_counts();
    let allocated: u64 = states
        .iter()
        .filter(|(s, _)| s.has_data())
        .map(|(_, n)| n)
        .sum();
    assert!(allocated <= BLOCKS, "{states:?}");
    assert!(!states
        .iter()
        .any(|(s, _)| *s == PayloadBlockState::NotPresent && !differencing));
    check_content(&chain);
    let report = check::check_file(chain.leaf());
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    let size = std::fs::metadata(&leaf).unwrap().len();
    chain.close().unwrap();
    // Header section, log, BAT, metadata (4 MiB), the blocks, a bitmap block when differencing.
    assert!(
        size <= 4 * MIB + BLOCKS * BLOCK + MIB,
        "the file grew to {size} bytes: a block was allocated twice"
    );
}

#[test]
fn concurrent_first_touches_of_a_dynamic_file_allocate_each_block_once() {
    run(false);
}

#[test]
fn concurrent_first_touches_of_a_differencing_file_allocate_each_block_once() {
    run(true);
}
