//! vhost-user-vhdx: serve VHDX disks (fixed, dynamic and differencing) to virtual machines over
//! vhost-user-blk, and the image tools around it.

pub mod backend;
pub mod cli;
pub mod daemon;
pub mod guest_io;
pub mod helper_pool;
pub mod io;
pub mod requests;
pub mod vhdx;
pub mod virtio_blk;
