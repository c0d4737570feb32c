#![no_main]
//! See vhost_user_vhdx_fuzz::virtio_parse.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhost_user_vhdx_fuzz::virtio_parse::run(data);
});
