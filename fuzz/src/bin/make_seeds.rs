//! Writes seed corpora: `make_seeds <corpus dir> [fixture.vhdx.gz | seed dir ...]` fills
//! `<dir>/<target>/` for every target. Images are made here (dynamic, fixed, 4K sectors, a
//! differencing file with its locator, a file with a log to replay), taken from the fixtures
//! given (gzipped images) and from seed folders (images already in the fuzzer's sparse
//! encoding, such as `seeds/hostile/`: the damaged files of the main crate's `tests/hostile.rs`);
//! the log target gets each image's log.
//!
//! `make_seeds --encode <out dir> <image ...>` writes images in the sparse encoding (how
//! `seeds/hostile/` is made; see README.md).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost_user_vhdx::vhdx::create::{create, create_on, CreateOptions, Subformat};
use vhost_user_vhdx::vhdx::{Chain, ChainOptions, MemStorage, Storage, VhdxFile};
use vhost_user_vhdx_fuzz::{sparse, storage::Capped};

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(name), bytes).unwrap();
}

fn image(options: &CreateOptions) -> Vec<u8> {
    let m = MemStorage::default();
    create_on(&m, options).unwrap();
    m.into_inner()
}

/// An image whose log holds entries: written, flushed, never closed.
fn dirty(mut bytes: Vec<u8>) -> Vec<u8> {
    let storage = Arc::new(Capped::new(std::mem::take(&mut bytes)));
    let file = VhdxFile::open_storage(storage.clone(), PathBuf::from("/seed.vhdx"), true).unwrap();
    let chain = Chain::from_layers(vec![file]).unwrap();
    chain.write_at(&[0x5a; 4096], 0).unwrap();
    chain.write_at(&[0xa5; 4096], (1 << 20) + 4096).unwrap();
    chain.write_zeroes(2 << 20, 1 << 20).unwrap();
    chain.flush().unwrap();
    // Dropped without close: the log is not emptied.
    drop(chain);
    let mut out = vec![0u8; storage.len().unwrap() as usize];
    storage.read_at(&mut out, 0).unwrap();
    out
}

/// The sparse encoding of `bytes`, or None if it would be too large to be a useful seed (a
/// damaged file with whole blocks of data: libFuzzer mutates small inputs best).
fn encode_seed(bytes: &[u8]) -> Option<Vec<u8>> {
    let seed = sparse::encode(bytes);
    (seed.len() <= MAX_SEED).then_some(seed)
}

/// Seeds larger than this are left out.
const MAX_SEED: usize = 64 << 10;

fn encode_files(out: &Path, files: &[String]) {
    std::fs::create_dir_all(out).unwrap();
    for f in files {
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("{f}: {e}"));
        let name = Path::new(f)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string();
        match encode_seed(&bytes) {
            Some(seed) => std::fs::write(out.join(name), seed).unwrap(),
            None => eprintln!("{f}: left out (its encoding is over {MAX_SEED} bytes)"),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--encode") {
        return encode_files(Path::new(&args[2]), &args[3..]);
    }
    let dir = PathBuf::from(&args[1]);
    let small = |lss: u32, subformat: Subformat| CreateOptions {
        virtual_size: Some(4 << 20),
        block_size: Some(1 << 20),
        logical_sector_size: Some(lss),
        subformat,
        ..Default::default()
    };
    let mut images: Vec<(String, Vec<u8>)> = vec![
        ("dynamic".into(), image(&small(512, Subformat::Dynamic))),
        ("dynamic-4k".into(), image(&small(4096, Subformat::Dynamic))),
        ("fixed".into(), image(&small(512, Subformat::Fixed))),
    ];
    images.push(("dirty".into(), dirty(images[0].1.clone())));
    images.push(("dirty-4k".into(), dirty(images[1].1.clone())));
    // A differencing file, made on disk because its locator names the parent's path.
    let tmp = std::env::temp_dir().join(format!("vhdx-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let parent = tmp.join("parent.vhdx");
    let child = tmp.join("child.vhdx");
    let _ = std::fs::remove_file(&parent);
    let _ = std::fs::remove_file(&child);
    create(&parent, &small(512, Subformat::Dynamic)).unwrap();
    create(
        &child,
        &CreateOptions {
            parent: Some(parent.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    {
        let c = Chain::open(
            &child,
            &ChainOptions {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        c.write_at(&[0x33; 1024], 4096).unwrap();
        c.close().unwrap();
    }
    images.push(("differencing".into(), std::fs::read(&child).unwrap()));
    std::fs::remove_dir_all(&tmp).unwrap();
    for f in &args[2..] {
        if Path::new(f).is_dir() {
            let mut seeds: Vec<_> = std::fs::read_dir(f)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            seeds.sort();
            for s in seeds {
                let name = s.file_name().unwrap().to_string_lossy().to_string();
                images.push((name, sparse::decode(&std::fs::read(&s).unwrap())));
            }
            continue;
        }
        let mut gz = flate2::read::GzDecoder::new(std::fs::File::open(f).unwrap());
        let mut bytes = Vec::new();
        gz.read_to_end(&mut bytes).unwrap();
        let name = Path::new(f)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        images.push((name, bytes));
    }
    for (name, bytes) in &images {
        let mut seed = sparse::encode(bytes);
        put(&dir, "open_image", name, &seed);
        // The same with the checksum fix-up on (see open_image).
        seed[3] |= 0x80;
        put(&dir, "open_image", &format!("{name}-fixup"), &seed);
        // The log target: LogGuid, file size, log (headers say where; ours is at 1 MiB).
        if let Ok(f) = VhdxFile::open_storage(
            Arc::new(MemStorage::new(bytes.clone())),
            PathBuf::from("/seed.vhdx"),
            false,
        ) {
            let h = f.headers.current;
            if !h.log_guid.is_nil() {
                let start = h.log_offset as usize;
                let end = (start + h.log_length as usize).min(bytes.len());
                let mut seed = h.log_guid.to_bytes_le().to_vec();
                seed.extend((bytes.len() as u64).to_le_bytes());
                seed.extend(&bytes[start..end]);
                put(&dir, "log_replay", name, &seed);
            }
        }
    }
    // Request targets: a few shapes each (an empty input is a valid request list too).
    for (i, seed) in [&[][..], &[0u8; 64][..], &[0xff; 64][..]]
        .iter()
        .enumerate()
    {
        for t in ["virtio_parse", "queue_requests", "write_model", "restart"] {
            put(&dir, t, &format!("plain-{i}"), seed);
        }
    }
}
