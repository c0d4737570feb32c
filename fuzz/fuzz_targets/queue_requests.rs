#![no_main]
//! See vhost_user_vhdx_fuzz::queue_requests.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhost_user_vhdx_fuzz::queue_requests::run(data);
});
