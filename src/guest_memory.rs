//! Guest memory that can fault: a region whose fd shrinks after it was mapped raises SIGBUS on
//! access. Placeholder: the handler registers mappings here.

use std::sync::Arc;

use vm_memory::GuestRegionMmap;

/// The guest memory regions in use now.
pub fn track(_regions: &[Arc<GuestRegionMmap>]) {}

/// Another shared mapping that the VMM could shrink (the in-flight region).
pub fn track_mapping(_addr: usize, _len: usize) {}
