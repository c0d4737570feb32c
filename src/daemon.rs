//! The serving loop: listen (a socket path, or an inherited listening fd), serve one VMM
//! connection at a time, and serve the next after a disconnect (guest reboot, QEMU restart).
//! SIGTERM/SIGINT end the current connection, let the queue threads finish the requests they
//! hold, flush, close the image cleanly and return.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{info, warn};
use nix::sys::signal::{SigSet, Signal};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{BlockBackend, BlockDevice};
use crate::sandbox::{self, ThreadKind};

pub enum Socket {
    Path(PathBuf),
    /// A listening unix socket handed over by a service manager (libvirt, systemd).
    Fd(RawFd),
}

/// Adopts an inherited listening socket.
fn listener_from_fd(fd: RawFd) -> std::io::Result<UnixListener> {
    // SAFETY: the caller named this descriptor as the listening socket handed to this process;
    // nothing else in the process owns it, so adopting it (and closing it on drop) is sound.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listener = UnixListener::from(owned);
    // Fails unless the fd is a unix socket.
    listener.local_addr()?;
    Ok(listener)
}

/// Serves `device` until SIGTERM or SIGINT; the caller then closes the image. The process
/// enters its sandbox once the socket listens, before the first connection.
pub fn serve(
    device: Arc<BlockDevice>,
    socket: Socket,
    sandbox: &sandbox::Config,
) -> Result<(), String> {
    let std_listener = match &socket {
        Socket::Path(p) => {
            // std binds and listens in one call, so the socket file exists only a moment
            // before it accepts (QEMU retries a refused connect when told to reconnect).
            let _ = std::fs::remove_file(p);
            UnixListener::bind(p).map_err(|e| format!("cannot listen on {}: {e}", p.display()))?
        }
        Socket::Fd(fd) => listener_from_fd(*fd).map_err(|e| format!("--fd {fd}: {e}"))?,
    };
    let wake_path = match &socket {
        Socket::Path(p) => Some(p.clone()),
        Socket::Fd(_) => std_listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.to_path_buf())),
    };
    // Kept to end a waiting accept when a wake-up connection cannot be made (below).
    let wake_listener = std_listener
        .try_clone()
        .map_err(|e| format!("listening socket: {e}"))?;
    sandbox::enter(sandbox, wake_path.as_deref())?;
    let mut listener = Listener::from(std_listener);

    // Signals are taken by one thread with sigwait; every other thread has them blocked.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
        .thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;
    let stopping = Arc::new(AtomicBool::new(false));
    let current: Arc<Mutex<Option<ShutdownHandle>>> = Arc::new(Mutex::new(None));
    {
        let stopping = Arc::clone(&stopping);
        let current = Arc::clone(&current);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                ThreadKind::Signals.confine();
                if let Ok(sig) = signals.wait() {
                    info!("{sig:?}: finishing the requests in flight and closing the image");
                }
                stopping.store(true, Ordering::SeqCst);
                if let Some(h) = current.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    h.shutdown();
                }
                // Unblock an accept() waiting for the next VMM: connect to it. When this
                // process may not (a socket made by root or systemd, mode 0660, and the
                // process has become another user; an abstract socket), shut the listener
                // down instead: the accept fails at once. A socket shared with systemd then
                // stops accepting, so its unit is stopped and started with the service.
                let woken = wake_path.is_some_and(|p| UnixStream::connect(p).is_ok());
                if !woken {
                    let _ = nix::sys::socket::shutdown(
                        wake_listener.as_raw_fd(),
                        nix::sys::socket::Shutdown::Read,
                    );
                }
            })
            .map_err(|e| format!("starting the signal thread: {e}"))?;
    }

    while !stopping.load(Ordering::SeqCst) {
        let mut daemon = VhostUserDaemon::new(
            "vhost-user-vhdx".into(),
            BlockBackend(Arc::clone(&device)),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| format!("creating the vhost-user daemon: {e}"))?;
        info!("waiting for a VMM on {}", listener.as_raw_fd());
        if let Err(e) = daemon.start(&mut listener) {
            if stopping.load(Ordering::SeqCst) {
                break;
            }
            warn!("accepting a connection: {e}");
            continue;
        }
        *current.lock().unwrap_or_else(|e| e.into_inner()) = daemon.shutdown_handle();
        if stopping.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        }
        match daemon.wait() {
            Ok(()) => info!("the VMM disconnected"),
            Err(e) if e.to_string().contains("disconnected") => info!("the VMM disconnected"),
            Err(e) => warn!("the connection ended: {e}"),
        }
        *current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // Stop the queue threads; each finishes the request it is executing first.
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        drop(daemon);
        if let Err(e) = device.chain().flush() {
            warn!("flush after disconnect: {e}");
        }
    }
    if let Socket::Path(p) = &socket {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}
