#![no_main]
//! See vhost_user_vhdx_fuzz::log_replay.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vhost_user_vhdx_fuzz::log_replay::run(data);
});
