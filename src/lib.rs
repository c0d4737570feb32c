//! vhost-user-vhdx: serve VHDX disks (fixed, dynamic and differencing) to virtual machines over
//! vhost-user-blk, and the image tools around it.

pub mod cli;
pub mod vhdx;
