//! `qemu-img bench` for our engine: the same options and the same access pattern, so that
//! `contrib/bench/engine.sh` can run both on the same VHDX geometry and compare.
//!
//! engine_bench [-w] [-c COUNT] [-d THREADS] [-s SIZE] [-S STEP] [-o OFFSET]
//!              [--flush-interval N] IMAGE
//! Request i goes to OFFSET + i * STEP (wrapping at the end of the disk), as in qemu-img bench.
//! With -d N, N threads take requests in order from a shared counter.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use vhost_user_vhdx::vhdx::{Chain, ChainOptions};

fn size(s: &str) -> u64 {
    vhost_user_vhdx::cli::options::parse_size(s).unwrap_or_else(|e| panic!("{e}"))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut write, mut count, mut depth, mut bufsize, mut step, mut offset, mut flush_every) =
        (false, 75000u64, 1u64, 4096u64, 0u64, 0u64, 0u64);
    let mut image = None;
    while let Some(a) = args.next() {
        let mut val = || args.next().expect("option value");
        match a.as_str() {
            "-w" => write = true,
            "-c" => count = size(&val()),
            "-d" => depth = size(&val()),
            "-s" => bufsize = size(&val()),
            "-S" => step = size(&val()),
            "-o" => offset = size(&val()),
            "--flush-interval" => flush_every = size(&val()),
            _ if a.starts_with("--flush-interval=") => flush_every = size(&a[17..]),
            _ => image = Some(PathBuf::from(a)),
        }
    }
    let image = image.expect("IMAGE");
    let step = if step == 0 { bufsize } else { step };
    let chain = Chain::open(
        &image,
        &ChainOptions {
            writable: write,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let disk = chain.virtual_size();
    println!(
        "Sending {count} {} requests, {bufsize} bytes each, {depth} in parallel (starting at offset {offset}, step size {step})",
        if write { "write" } else { "read" }
    );
    let next = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..depth {
            s.spawn(|| {
                let mut buf = vec![0xa5u8; bufsize as usize];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let off = (offset + i * step) % (disk - bufsize + 1) / 512 * 512;
                    if write {
                        chain.write_at(&buf, off).unwrap();
                        if flush_every > 0 && (i + 1) % flush_every == 0 {
                            chain.flush().unwrap();
                        }
                    } else {
                        chain.read_at(&mut buf, off).unwrap();
                    }
                }
            });
        }
    });
    println!(
        "Run completed in {:.3} seconds.",
        started.elapsed().as_secs_f64()
    );
    chain.close().unwrap();
}
