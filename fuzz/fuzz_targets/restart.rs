#![no_main]
//! See vhost_user_vhdx_fuzz::restart.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhost_user_vhdx_fuzz::restart::run(data);
});
