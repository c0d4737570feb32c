//! The serving loop: listen (a socket path, or an inherited listening fd), serve one VMM
//! connection at a time, and serve the next after a disconnect (guest reboot, QEMU restart, a
//! backend restart the VMM reconnects to). SIGTERM/SIGINT end the current connection, let the
//! queue threads finish the requests they hold, flush, close the image cleanly and return.
//!
//! The listener and the connection are waited on in epoll together with a stop eventfd that the
//! signal thread sets, so a stop is seen at once whatever the socket is (a path, an abstract or
//! unnamed socket handed over with `--fd`); a connection stuck in the middle of a message is shut
//! down from the signal thread. No wake-up connection to our own socket is needed, which matters
//! in the sandbox: the process may not connect to it (another user after `--user`, a socket
//! made by systemd, Landlock).
//!
//! [`listen`] binds (or adopts) the listening socket before the caller enters the sandbox
//! (`crate::sandbox::enter`); [`serve`] runs inside it. The thread that calls [`serve`] is the
//! vhost-user control thread: it accepts, handles each connection's messages and starts and joins
//! that connection's queue threads, and confines itself as such once the signal thread is started.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use log::{info, warn};
use nix::sys::signal::{SigSet, Signal};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::BlockDevice;
use crate::handler::BlkHandler;
use crate::sandbox::ThreadKind;

pub enum Socket {
    Path(PathBuf),
    /// A listening unix socket handed over by a service manager (libvirt, systemd).
    Fd(RawFd),
}

/// Adopts an inherited listening socket.
fn listener_from_fd(fd: RawFd) -> io::Result<UnixListener> {
    // SAFETY: the caller named this descriptor as the listening socket handed to this process;
    // nothing else in the process owns it, so adopting it (and closing it on drop) is sound.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listener = UnixListener::from(owned);
    // Fails unless the fd is a unix socket.
    listener.local_addr()?;
    Ok(listener)
}

// Not 0: an entry epoll did not fill reads as 0.
const TOKEN_STOP: u64 = 1;
const TOKEN_SOCKET: u64 = 2;

/// Waits until `fd` is readable or the stop eventfd is set; true if stopping.
struct Waiter {
    epoll: Epoll,
}

impl Waiter {
    fn new(stop: &EventFd, fd: RawFd) -> io::Result<Waiter> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_STOP),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, TOKEN_SOCKET),
        )?;
        Ok(Waiter { epoll })
    }

    /// True if the stop eventfd is set.
    fn wait(&self) -> io::Result<bool> {
        let mut events = [EpollEvent::default(); 2];
        loop {
            match self.epoll.wait(-1, &mut events) {
                // `take`: a count past the array (which only a debugger rewriting the call's
                // result can make, as tests/sandbox.rs does) is no reason to panic or stop.
                Ok(n) => return Ok(events.iter().take(n).any(|e| e.data() == TOKEN_STOP)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Binds `socket` (or adopts the inherited listening fd), ready for [`serve`].
pub fn listen(socket: &Socket) -> Result<UnixListener, String> {
    let listener = match socket {
        Socket::Path(p) => {
            // std binds and listens in one call, so the socket file exists only a moment
            // before it accepts (QEMU retries a refused connect when told to reconnect).
            let _ = std::fs::remove_file(p);
            UnixListener::bind(p).map_err(|e| format!("cannot listen on {}: {e}", p.display()))?
        }
        Socket::Fd(fd) => listener_from_fd(*fd).map_err(|e| format!("--fd {fd}: {e}"))?,
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listening socket: {e}"))?;
    Ok(listener)
}

/// Serves `device` on `listener` until SIGTERM or SIGINT; the caller then closes the image.
/// Runs inside the sandbox, if there is one: the calling thread becomes the control thread.
pub fn serve(
    device: Arc<BlockDevice>,
    listener: UnixListener,
    socket: &Socket,
) -> Result<(), String> {
    // Signals are taken by one thread with sigwait; every other thread has them blocked.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
        .thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;
    let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?);
    // The connection being served, to shut down if it is stuck in a message at a stop.
    let current: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
    {
        let stop = Arc::clone(&stop);
        let current = Arc::clone(&current);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                ThreadKind::Signals.confine();
                if let Ok(sig) = signals.wait() {
                    info!("{sig:?}: finishing the requests in flight and closing the image");
                }
                let _ = stop.write(1);
                if let Some(c) = current.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
            })
            .map_err(|e| format!("starting the signal thread: {e}"))?;
    }

    let waiter = Waiter::new(&stop, listener.as_raw_fd()).map_err(|e| format!("epoll: {e}"))?;
    // From here this thread accepts and handles messages; the queue threads it starts inherit
    // this narrowing and narrow themselves further.
    ThreadKind::Control.confine();
    info!("waiting for a VMM on {}", listener.as_raw_fd());
    loop {
        match waiter.wait() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(format!("waiting for a VMM: {e}")),
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn!("accepting a connection: {e}");
                // Not a loop on the same error: wait for the listener again.
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        let stopping = serve_connection(&device, stream, &stop, &current);
        *current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(e) = device.chain().flush() {
            warn!("flush after disconnect: {e}");
        }
        if stopping {
            break;
        }
        info!("waiting for a VMM on {}", listener.as_raw_fd());
    }
    if let Socket::Path(p) = socket {
        // Refused inside the sandbox (EACCES: no path access): the socket file stays, and the
        // next start replaces it.
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// Serves one connection until it ends; true if the process is stopping.
fn serve_connection(
    device: &Arc<BlockDevice>,
    stream: UnixStream,
    stop: &EventFd,
    current: &Mutex<Option<UnixStream>>,
) -> bool {
    if let Err(e) = stream.set_nonblocking(false) {
        warn!("connection: {e}");
        return false;
    }
    let waiter = match Waiter::new(stop, stream.as_raw_fd()) {
        Ok(w) => w,
        Err(e) => {
            warn!("connection: {e}");
            return false;
        }
    };
    match stream.try_clone() {
        Ok(c) => *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(c),
        Err(e) => warn!("connection: {e}"),
    }
    let handler = match BlkHandler::new(Arc::clone(device)) {
        Ok(h) => Arc::new(Mutex::new(h)),
        Err(e) => {
            warn!("starting the queue threads: {e}");
            return false;
        }
    };
    info!("a VMM connected");
    let mut conn = BackendReqHandler::from_stream(stream, Arc::clone(&handler));
    let stopping = loop {
        match waiter.wait() {
            Ok(true) => break true,
            Ok(false) => {}
            Err(e) => {
                warn!("connection: {e}");
                break false;
            }
        }
        let result = conn.handle_request();
        let refusal = handler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_refusal();
        match result {
            Ok(()) => {}
            Err(
                VhostError::Disconnected
                | VhostError::PartialMessage
                | VhostError::SocketBroken(_)
                | VhostError::SocketError(_),
            ) => {
                info!("the VMM disconnected");
                break false;
            }
            Err(e) => {
                match refusal {
                    // Answered with an error (if the VMM asked for replies) and logged: go on.
                    Some(_) => {}
                    None => {
                        warn!("the connection ended: {e}");
                        break false;
                    }
                }
            }
        }
    };
    // The socket closes, then the queue threads finish what they hold and are joined.
    drop(conn);
    drop(handler);
    crate::guest_memory::sweep();
    stopping
}
