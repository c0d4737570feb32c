use std::path::Path;
use vhost_user_vhdx::vhdx::{create, Chain, ChainOptions};
fn main() {
    let d = Path::new("/tmp/ds");
    let _ = std::fs::remove_dir_all(d);
    std::fs::create_dir_all(d).unwrap();
    let base = d.join("base.vhdx");
    let leaf = d.join("leaf.vhdx");
    create::create(
        &base,
        &create::CreateOptions {
            virtual_size: Some(8 << 20),
            block_size: Some(1 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    let c = Chain::open(
        &base,
        &ChainOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    c.write_at(&vec![0x99u8; 8 << 20], 0).unwrap();
    c.close().unwrap();
    create::create(
        &leaf,
        &create::CreateOptions {
            parent: Some(base.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let c = Chain::open(
        &leaf,
        &ChainOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    c.discard(1 << 20, 1 << 20).unwrap(); // block 1 -> UNMAPPED
    c.write_zeroes(2 << 20, 1 << 20).unwrap(); // block 2 -> ZERO
    c.write_at(&vec![0x11u8; 4096], (3 << 20) + 8192).unwrap(); // block 3 partial
    c.close().unwrap();
}
