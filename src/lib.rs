//! vhost-user-vhdx: serve VHDX disks (fixed, dynamic and differencing) to virtual machines over
//! vhost-user-blk, and the image tools around it.

pub mod async_requests;
pub mod backend;
pub mod cli;
pub mod daemon;
pub mod guest_io;
pub mod guest_memory;
pub mod handler;
pub mod held;
pub mod helper_pool;
pub mod inflight;
pub mod io;
pub mod poll;
pub mod queue;
pub mod requests;
pub mod ring;
pub mod sandbox;
pub mod vhdx;
pub mod virtio_blk;
