//! Guest memory that can fault. Each region is checked against its fd's size when it is mapped
//! (the handler refuses a region longer than its file), but the VMM can shrink the file later
//! (`ftruncate` on a memfd), and then touching the missing pages raises SIGBUS, which would end
//! the process with the image's log dirty.
//!
//! So every mapping the VMM could shrink (guest memory regions, the in-flight region) is
//! registered here, and a SIGBUS handler turns a fault inside one of them into a harmless one:
//! it maps an anonymous zero page over the faulting page (so the access completes, reading
//! zeros, and the mapping stays whole) and counts the fault. A request that saw the counter
//! change while it ran fails with IOERR ([`faults`]); the memory that shrank reads as zeros from
//! then on, which is the VMM's doing. A SIGBUS anywhere else keeps its default action.
//!
//! The kernel's own accesses (`preadv`/`pwritev` on guest buffers) do not raise SIGBUS: they
//! return EFAULT, which the request turns into IOERR without poisoning the image
//! (`guest_io`, `vhdx::buffers::SourceFault`).
//!
//! A registered mapping stays registered (and mapped: the registry holds a reference) until no
//! one else holds it: [`sweep`] drops those, so address ranges are never reused while listed.

use std::any::Any;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};

use nix::libc;
use vm_memory::GuestRegionMmap;

/// Mappings listed at once: 509 memory slots, the in-flight region, and one old generation.
const SLOTS: usize = 1040;

#[allow(clippy::declare_interior_mutable_const)] // only an initialiser for the arrays
const ZERO: AtomicUsize = AtomicUsize::new(0);
/// Where the listed mappings start and how long they are (0: a free slot); read by the signal
/// handler, so plain atomics: a slot's length is cleared before it changes.
static STARTS: [AtomicUsize; SLOTS] = [ZERO; SLOTS];
static LENS: [AtomicUsize; SLOTS] = [ZERO; SLOTS];
static FAULTS: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

struct Listed {
    slot: usize,
    start: usize,
    keep: Arc<dyn Any + Send + Sync>,
}

static LISTED: Mutex<Vec<Listed>> = Mutex::new(Vec::new());

/// Blocks every signal on the calling thread except the synchronous fault signals: SIGBUS must
/// reach the handler here (a blocked SIGBUS from a fault kills the process), SIGSYS must reach
/// the sandbox's handler that names a forbidden call, and the others could not be blocked
/// anyway. Worker threads call this; SIGTERM and SIGINT are for the
/// daemon's signal thread.
pub fn block_async_signals() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::all();
    for s in [
        Signal::SIGBUS,
        Signal::SIGSYS,
        Signal::SIGSEGV,
        Signal::SIGILL,
        Signal::SIGFPE,
    ] {
        set.remove(s);
    }
    let _ = set.thread_block();
}

/// Faults caught in guest memory so far.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Acquire)
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for i in 0..SLOTS {
        let len = LENS[i].load(Ordering::Acquire);
        if len == 0 {
            continue;
        }
        let start = STARTS[i].load(Ordering::Acquire);
        if addr >= start && addr - start < len {
            let page = addr & !(page_size() - 1);
            // SAFETY: the page lies in a mapping this process made for guest memory and still
            // holds (the registry keeps it); replacing it with a private zero page changes only
            // what that guest memory reads as. mmap is a plain system call, safe in a handler.
            let p = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    page_size(),
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                FAULTS.fetch_add(1, Ordering::AcqRel);
                return;
            }
        }
    }
    // Not guest memory: the default action (the access faults again and ends the process).
    // SAFETY: resetting a signal's disposition is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096)
}

fn install() {
    INSTALL.call_once(|| {
        let _ = page_size();
        // SAFETY: a zeroed sigaction is a valid starting point; the handler above only uses
        // atomics and mmap.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
                log::warn!(
                    "cannot catch SIGBUS: a guest memory file shrunk later would end the process"
                );
            }
        }
    });
}

fn list(start: usize, len: usize, keep: Arc<dyn Any + Send + Sync>) {
    install();
    let mut listed = LISTED.lock().unwrap_or_else(|e| e.into_inner());
    sweep_locked(&mut listed);
    if listed.iter().any(|l| l.start == start) {
        return;
    }
    let Some(slot) = (0..SLOTS).find(|&i| LENS[i].load(Ordering::Acquire) == 0) else {
        log::warn!("too many guest memory mappings to watch for SIGBUS");
        return;
    };
    STARTS[slot].store(start, Ordering::Release);
    LENS[slot].store(len, Ordering::Release);
    listed.push(Listed { slot, start, keep });
}

fn sweep_locked(listed: &mut Vec<Listed>) {
    listed.retain(|l| {
        if Arc::strong_count(&l.keep) > 1 {
            return true;
        }
        LENS[l.slot].store(0, Ordering::Release);
        false
    });
}

/// Registers guest memory regions (those already listed are skipped).
pub fn track(regions: &[Arc<GuestRegionMmap>]) {
    for r in regions {
        let start = r.as_ptr() as usize;
        let len = r.size();
        list(start, len, Arc::clone(r) as Arc<dyn Any + Send + Sync>);
    }
}

/// Registers another shared mapping the VMM could shrink, kept alive by `keep`.
pub fn track_mapping(start: usize, len: usize, keep: Arc<dyn Any + Send + Sync>) {
    list(start, len, keep);
}

/// Forgets (and so unmaps) the mappings no one else holds any more.
pub fn sweep() {
    sweep_locked(&mut LISTED.lock().unwrap_or_else(|e| e.into_inner()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, MmapRegion};

    #[test]
    fn a_shrunk_file_under_guest_memory_reads_as_zeros_and_counts_a_fault() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[0x5a; 8192]).unwrap();
        let f2 = file.try_clone().unwrap();
        let map = MmapRegion::<()>::from_file(FileOffset::new(f2, 0), 8192).unwrap();
        let region = Arc::new(GuestRegionMmap::new(map, GuestAddress(0)).unwrap());
        track(&[Arc::clone(&region)]);
        let mem = GuestMemoryMmap::from_arc_regions(vec![Arc::clone(&region)]).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4096)).unwrap(), 0x5a);
        file.set_len(4096).unwrap();
        let before = faults();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4100)).unwrap(), 0);
        assert!(faults() > before);
        // The first page is still the file's.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 0x5a);
        drop(mem);
        drop(region);
        sweep();
        assert!(!LISTED
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.keep.is::<GuestRegionMmap>() && Arc::strong_count(&l.keep) == 1));
    }
}
