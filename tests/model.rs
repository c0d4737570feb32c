//! Randomised model test of the write path: thousands of random writes, discards,
//! write-zeroes, flushes, clean reopens and abandoned (dirty-log) reopens on fixed, dynamic and
//! differencing (depth 3) files, 512- and 4096-byte sectors, 1 and 32 MiB blocks. After every
//! step the touched range is compared with an in-memory model, and the whole disk after every
//! reopen. At the end, qemu-img (non-differencing) and pyvhdi (every file, chains through
//! `set_parent`) must read the same content, and `qemu-img check` must be clean.

mod common;

use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vhost_user_vhdx::vhdx::check::{self, Repair};
use vhost_user_vhdx::vhdx::create::{self, CreateOptions, Subformat};
use vhost_user_vhdx::vhdx::Chain;

const MIB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Dynamic,
    Fixed,
    /// A leaf over two parents that hold data of their own.
    Differencing,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    kind: Kind,
    sector: u32,
    block: u64,
    ops: usize,
    seed: u64,
}

struct Harness {
    case: Case,
    rng: StdRng,
    size: u64,
    model: Vec<u8>,
    path: PathBuf,
    chain: Option<Chain>,
    step: usize,
}

impl Harness {
    fn chain(&self) -> &Chain {
        self.chain.as_ref().expect("open")
    }

    fn sectors(&mut self, max_bytes: u64) -> u64 {
        let lss = u64::from(self.case.sector);
        let max = (max_bytes / lss).max(1);
        let n = match self.rng.gen_range(0..20) {
            0..=11 => self.rng.gen_range(1..=max.min(16)),
            12..=16 => self.rng.gen_range(1..=max.min(256 * 1024 / lss)),
            17..=18 => self.rng.gen_range(1..=max),
            _ => self.case.block / lss, // exactly one block
        };
        n * lss
    }

    /// A random sector-aligned range inside the disk, sometimes block-aligned.
    fn range(&mut self, max_bytes: u64) -> (u64, u64) {
        let lss = u64::from(self.case.sector);
        let len = self.sectors(max_bytes).min(self.size);
        let mut off = self.rng.gen_range(0..=(self.size - len) / lss) * lss;
        if self.rng.gen_bool(0.3) {
            off = off / self.case.block * self.case.block;
            if off + len > self.size {
                off = self.size - len;
            }
        }
        (off, len)
    }

    fn verify(&self, off: u64, len: u64) {
        let mut buf = vec![0u8; len as usize];
        self.chain().read_at(&mut buf, off).unwrap_or_else(|e| {
            panic!(
                "{:?} step {}: read {off:#x}+{len:#x}: {e}",
                self.case, self.step
            )
        });
        let want = &self.model[off as usize..(off + len) as usize];
        if buf != want {
            let i = buf.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!(
                "{:?} step {}: byte {:#x} reads {:#04x}, the model says {:#04x}",
                self.case,
                self.step,
                off + i as u64,
                buf[i],
                want[i]
            );
        }
    }

    fn verify_all(&self) {
        let chunk = 8 * MIB;
        let mut off = 0;
        while off < self.size {
            let n = chunk.min(self.size - off);
            self.verify(off, n);
            off += n;
        }
    }

    fn write(&mut self) {
        let (off, len) = self.range(self.case.block + self.case.block / 2);
        let fill: u8 = self.rng.gen();
        let mut data = vec![fill; len as usize];
        // Mark every sector so that misplaced sectors are caught, not just wrong blocks.
        for (i, sector) in data.chunks_mut(self.case.sector as usize).enumerate() {
            sector[..8]
                .copy_from_slice(&(off / u64::from(self.case.sector) + i as u64).to_le_bytes());
        }
        self.chain()
            .write_at(&data, off)
            .unwrap_or_else(|e| panic!("{:?} step {}: write: {e}", self.case, self.step));
        self.model[off as usize..(off + len) as usize].copy_from_slice(&data);
        self.verify_around(off, len, 4096);
    }

    /// Verifies both edges of `[off, off + len)` with `margin` bytes on each side (margin: a
    /// sector multiple), and the inside where it is small; `verify_all` covers the rest.
    fn verify_around(&self, off: u64, len: u64, margin: u64) {
        let end = off + len;
        let from = off.saturating_sub(margin);
        let to = (end + margin).min(self.size);
        if to - from <= 4 * margin {
            self.verify(from, to - from);
        } else {
            self.verify(from, 2 * margin);
            self.verify(to - 2 * margin, 2 * margin);
        }
    }

    fn trim(&mut self, zero: bool) {
        let (off, len) = self.range(3 * self.case.block);
        if zero {
            self.chain().write_zeroes(off, len).unwrap();
            self.model[off as usize..(off + len) as usize].fill(0);
        } else {
            self.chain().discard(off, len).unwrap();
            // Whole blocks read as zeros afterwards; partial edges keep their data.
            let b = self.case.block;
            let mut pos = off.div_ceil(b) * b;
            while pos < off + len {
                let end = (pos + b).min(self.size);
                if end <= off + len {
                    self.model[pos as usize..end as usize].fill(0);
                }
                pos += b;
            }
        }
        self.verify_around(off, len, 64 * 1024);
    }

    fn reopen(&mut self, clean: bool) {
        let chain = self.chain.take().unwrap();
        if clean {
            chain.close().unwrap();
        } else {
            // Abandoned without a clean close: the log stays set and the next open replays it.
            drop(chain);
        }
        self.chain = Some(common::open_writable(&self.path));
        self.verify_all();
    }
}

/// Writes random data into a new file through the engine; returns its content.
fn fill_parent(path: &Path, size: u64, sector: u64, rng: &mut StdRng, model: &mut [u8]) {
    let chain = common::open_writable(path);
    for _ in 0..40 {
        let len = rng.gen_range(1..=(3 * MIB / sector)) * sector;
        let off = rng.gen_range(0..=(size - len) / 4096) * 4096;
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        chain.write_at(&data, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    chain.close().unwrap();
}

fn run(case: Case) {
    // Durability is the crash test's subject; here fsync only costs time, so use memory.
    let dir = if Path::new("/dev/shm").is_dir() {
        tempfile::Builder::new()
            .prefix("vhdx-model-")
            .tempdir_in("/dev/shm")
            .unwrap()
    } else {
        common::tempdir("model-")
    };
    let mut rng = StdRng::seed_from_u64(case.seed);
    let size = 3 * case.block + 8 * u64::from(case.sector);
    let mut model = vec![0u8; size as usize];
    let opts = |subformat, parent: Option<PathBuf>| CreateOptions {
        virtual_size: if parent.is_some() { None } else { Some(size) },
        block_size: Some(case.block as u32),
        logical_sector_size: Some(case.sector),
        subformat,
        parent,
        ..Default::default()
    };
    let leaf = dir.path().join("leaf.vhdx");
    let mut chain_paths = vec![leaf.clone()];
    match case.kind {
        Kind::Dynamic => create::create(&leaf, &opts(Subformat::Dynamic, None)).unwrap(),
        Kind::Fixed => create::create(&leaf, &opts(Subformat::Fixed, None)).unwrap(),
        Kind::Differencing => {
            let base = dir.path().join("base.vhdx");
            let mid = dir.path().join("mid.vhdx");
            create::create(&base, &opts(Subformat::Dynamic, None)).unwrap();
            fill_parent(&base, size, case.sector.into(), &mut rng, &mut model);
            create::create(&mid, &opts(Subformat::Dynamic, Some(base.clone()))).unwrap();
            fill_parent(&mid, size, case.sector.into(), &mut rng, &mut model);
            create::create(&leaf, &opts(Subformat::Dynamic, Some(mid.clone()))).unwrap();
            chain_paths.extend([mid, base]);
        }
    }
    let parents_before: Vec<Vec<u8>> = chain_paths[1..]
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let mut h = Harness {
        case,
        rng,
        size,
        model,
        path: leaf.clone(),
        chain: Some(common::open_writable(&leaf)),
        step: 0,
    };
    h.verify_all();
    for step in 0..case.ops {
        h.step = step;
        match h.rng.gen_range(0..100) {
            0..=59 => h.write(),
            60..=71 => h.trim(true),
            72..=83 => h.trim(false),
            84..=94 => h.chain().flush().unwrap(),
            95..=97 => h.reopen(true),
            _ => h.reopen(false),
        }
        if step % 250 == 249 {
            h.verify_all();
        }
    }
    h.chain.take().unwrap().close().unwrap();

    // The parents were opened read-only throughout: unchanged byte for byte.
    for (p, before) in chain_paths[1..].iter().zip(&parents_before) {
        assert!(
            std::fs::read(p).unwrap() == *before,
            "{:?}: parent {} changed",
            case,
            p.display()
        );
    }
    let report = check::check(&leaf, Repair::None, &[]);
    assert!(
        report.corruptions.is_empty(),
        "{case:?}: check: {:?}",
        report.corruptions
    );

    let expected = dir.path().join("expected.raw");
    std::fs::write(&expected, &h.model).unwrap();
    let ours = dir.path().join("pyvhdi.raw");
    let refs: Vec<&Path> = chain_paths.iter().map(|p| p.as_path()).collect();
    common::pyvhdi_read_raw(&ours, &refs);
    common::files_equal(&ours, &expected).unwrap_or_else(|e| panic!("{case:?}: pyvhdi: {e}"));
    if !matches!(case.kind, Kind::Differencing) && case.sector == 512 {
        let (code, out) = common::qemu_img_check(&leaf);
        assert_eq!(code, 0, "{case:?}: qemu-img check: {out}");
        let qemu = dir.path().join("qemu.raw");
        common::qemu_img_convert_raw(&leaf, &qemu);
        common::files_equal(&qemu, &expected).unwrap_or_else(|e| panic!("{case:?}: qemu-img: {e}"));
    }
}

fn cases(kind: Kind, seed: u64) {
    for (i, (sector, block)) in [(512, MIB), (512, 32 * MIB), (4096, MIB), (4096, 32 * MIB)]
        .into_iter()
        .enumerate()
    {
        run(Case {
            kind,
            sector,
            block,
            ops: 1500,
            seed: seed + i as u64,
        });
    }
}

#[test]
fn dynamic_files_match_the_model() {
    cases(Kind::Dynamic, 100);
}

#[test]
fn fixed_files_match_the_model() {
    cases(Kind::Fixed, 200);
}

#[test]
fn differencing_chains_match_the_model() {
    cases(Kind::Differencing, 300);
}
