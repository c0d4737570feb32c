//! Whole descriptor chains through the real split-queue code (virtio-queue's `Queue`, rings
//! laid out by its `MockSplitQueue` test utility) into the request executor
//! (`requests::Requests::execute`) on a small writable image: in memory (data copied through
//! a bounce buffer) or, as the daemon serves it, in a plain file, so that data moves by
//! `preadv`/`pwritev` straight from guest memory (`guest_io`'s `unsafe` code).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use arbitrary::{Result, Unstructured};
use vhost_user_vhdx::requests::Requests;
use vhost_user_vhdx::vhdx::create::{create_on, CreateOptions};
use vhost_user_vhdx::vhdx::{Chain, Storage, VhdxFile};
use vhost_user_vhdx::virtio_blk::Descriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::storage::Capped;

const QUEUE_SIZE: u16 = 16;
/// Guest memory; the rings are at 0, everything else after [`DATA`].
const MEM: u64 = 1 << 20;
const DATA: u64 = 0x1000;
/// The disk: 4 MiB in 1 MiB blocks.
const DISK: u64 = 4 << 20;

/// A new image, made once per process and copied for each input.
pub fn small_image(logical_sector_size: u32) -> Vec<u8> {
    static IMAGES: OnceLock<[Vec<u8>; 2]> = OnceLock::new();
    let images = IMAGES.get_or_init(|| {
        [512, 4096].map(|lss| {
            let storage = Capped::default();
            create_on(
                &storage,
                &CreateOptions {
                    virtual_size: Some(DISK),
                    block_size: Some(1 << 20),
                    logical_sector_size: Some(lss),
                    ..Default::default()
                },
            )
            .unwrap();
            storage.to_bytes()
        })
    });
    images[usize::from(logical_sector_size == 4096)].clone()
}

fn flags(u: &mut Unstructured) -> Result<u16> {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    Ok(match u.int_in_range(0..=7u8)? {
        0 => NEXT,
        1 => WRITE,
        2 => NEXT | WRITE,
        3 => 0,
        4 => INDIRECT,
        5 => NEXT | INDIRECT,
        _ => u.arbitrary()?,
    })
}

fn raw(u: &mut Unstructured) -> Result<RawDescriptor> {
    let addr = if u.ratio(1, 16)? {
        u.arbitrary()?
    } else {
        u.int_in_range(DATA..=MEM + 4096)? / 16 * 16
    };
    let len = if u.ratio(1, 16)? {
        u.arbitrary()?
    } else {
        u.int_in_range(0..=64u32 << 10)?
    };
    let flags = flags(u)?;
    let next = if u.ratio(1, 16)? {
        u.arbitrary()?
    } else {
        u.int_in_range(0..=QUEUE_SIZE - 1)?
    };
    Ok(RawDescriptor::from(SplitDescriptor::new(
        addr, len, flags, next,
    )))
}

/// The image in an unlinked temporary file: only its non-zero pages are written.
fn in_file(image: &[u8]) -> std::fs::File {
    use std::os::unix::fs::FileExt;
    let path = std::env::temp_dir().join(format!(
        "vhdx-fuzz-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file.set_len(image.len() as u64).unwrap();
    for (i, page) in image.chunks(4096).enumerate() {
        if page.iter().any(|&b| b != 0) {
            file.write_all_at(page, i as u64 * 4096).unwrap();
        }
    }
    file
}

pub fn run(data: &[u8]) {
    let _ = drive(Unstructured::new(data));
}

fn drive(mut u: Unstructured) -> Result<()> {
    let u = &mut u;
    let lss = if u.ratio(1, 4)? { 4096 } else { 512 };
    let writethrough = u.arbitrary()?;
    let plain_file = u.arbitrary()?;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
    for i in 0..QUEUE_SIZE {
        mock.desc_table().store(i, raw(u)?).unwrap();
    }
    let heads = u.int_in_range(0..=QUEUE_SIZE + 2)?;
    for k in 0..heads {
        let head = if u.ratio(1, 16)? {
            u.arbitrary()?
        } else {
            u.int_in_range(0..=QUEUE_SIZE - 1)?
        };
        mock.avail()
            .ring()
            .ref_at(usize::from(k % QUEUE_SIZE))
            .unwrap()
            .store(head);
    }
    mock.avail().idx().store(heads);
    // Request headers, data, range lists and indirect tables: the rest of the input, repeated
    // at a few places so that short inputs still give headers to chains pointing anywhere.
    let bytes = std::mem::replace(u, Unstructured::new(&[])).take_rest();
    if !bytes.is_empty() {
        for at in [DATA, 0x1_0000, 0x8_0000] {
            let n = bytes.len().min((MEM - at) as usize);
            mem.write_slice(&bytes[..n], GuestAddress(at)).unwrap();
        }
    }
    let storage: Arc<dyn Storage> = if plain_file {
        Arc::new(in_file(&small_image(lss)))
    } else {
        Arc::new(Capped::new(small_image(lss)))
    };
    let file = VhdxFile::open_storage(storage, PathBuf::from("/fuzz/disk.vhdx"), true)
        .expect("a new image opens");
    let requests = Requests {
        chain: Arc::new(Chain::from_layers(vec![file]).unwrap()),
        read_only: false,
        serial: "fuzz".into(),
        writethrough: AtomicBool::new(writethrough),
    };
    let mut queue: Queue = mock.create_queue().unwrap();
    for _ in 0..2 * QUEUE_SIZE {
        let Some(chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain
            .map(|d| Descriptor {
                addr: d.addr(),
                len: d.len(),
                writable: d.is_write_only(),
            })
            .collect();
        let used = requests.execute(&mem, &descs);
        black_box(queue.add_used(&mem, head, used).is_ok());
    }
    // Whatever the guest sent, the image stays consistent.
    let chain = Arc::into_inner(requests.chain).unwrap();
    let report = vhost_user_vhdx::vhdx::check::check_file(chain.leaf());
    assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    chain.close().unwrap();
    Ok(())
}
