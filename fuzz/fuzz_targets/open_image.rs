#![no_main]
//! See vhost_user_vhdx_fuzz::open_image.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhost_user_vhdx_fuzz::open_image::run(data);
});
