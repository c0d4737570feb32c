//! virtio-blk request parsing (`virtio_blk::parse`) and the disk-range check, over arbitrary
//! descriptor lists and guest memory contents.

use std::hint::black_box;

use arbitrary::{Result, Unstructured};
use vhost_user_vhdx::virtio_blk::{disk_range, parse, Descriptor, Kind};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory: small, so that descriptors often point inside it and sometimes past it.
const MEM: u64 = 64 << 10;

/// An address mostly inside guest memory, rarely anything.
pub fn addr(u: &mut Unstructured) -> Result<u64> {
    if u.ratio(1, 16)? {
        u.arbitrary()
    } else {
        u.int_in_range(0..=MEM + 4096)
    }
}

/// A length mostly a few sectors, rarely anything.
pub fn len(u: &mut Unstructured) -> Result<u32> {
    if u.ratio(1, 16)? {
        u.arbitrary()
    } else {
        u.int_in_range(0..=16 << 10)
    }
}

fn descriptors(u: &mut Unstructured) -> Result<Vec<Descriptor>> {
    let n = u.int_in_range(0..=8)?;
    (0..n)
        .map(|_| {
            Ok(Descriptor {
                addr: GuestAddress(addr(u)?),
                len: len(u)?,
                writable: u.arbitrary()?,
            })
        })
        .collect()
}

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(descs) = descriptors(&mut u) else {
        return;
    };
    let capacity: u64 = u.arbitrary().unwrap_or(8 << 20);
    let block = if u.arbitrary().unwrap_or(false) {
        4096
    } else {
        512
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let rest = u.take_rest();
    mem.write_slice(&rest[..rest.len().min(MEM as usize)], GuestAddress(0))
        .unwrap();
    match parse(&descs, &mem) {
        Ok(req) => {
            let sum: u64 = req.data.iter().map(|s| s.len).sum();
            assert_eq!(
                sum, req.data_len,
                "data segments and data_len disagree: {req:?}"
            );
            if matches!(req.kind, Kind::In | Kind::Out) {
                if let Ok((offset, n)) = disk_range(req.sector, req.data_len, capacity, block) {
                    assert!(offset.checked_add(n).is_some_and(|end| end <= capacity));
                }
            }
            black_box(req);
        }
        Err(e) => {
            black_box(e);
        }
    }
}
