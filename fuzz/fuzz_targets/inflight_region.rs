#![no_main]
//! See vhost_user_vhdx_fuzz::inflight_region.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhost_user_vhdx_fuzz::inflight_region::run(data);
});
