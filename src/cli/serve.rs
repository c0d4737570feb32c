//! `serve [OPTIONS] IMAGE`: the vhost-user-blk backend, with the options of the vhost-user
//! "backend program conventions" (QEMU docs/interop/vhost-user.rst) and the rust-vmm
//! vhost-device daemons.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::{CacheMode, ChainArgs, CliResult};
use crate::backend::{
    default_helper_threads, BlockDevice, DeviceOptions, DEFAULT_NUM_QUEUES, DEFAULT_QUEUE_SIZE,
};
use crate::daemon::{self, Socket};
use crate::io::AioMode;
use crate::sandbox::{self, SeccompMode};
use crate::vhdx::{Chain, ChainOptions};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Listen on this unix socket (created; an old socket file is replaced).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["fd", "print_capabilities"], conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// Serve on an already-listening unix socket handed over by libvirt or systemd.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,
    /// Print the backend's capabilities as JSON (vhost-user backend conventions) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
    /// Serve read-only: writes, discards and write-zeroes fail.
    #[arg(long)]
    pub read_only: bool,
    /// Queues offered to the VMM (at most 64).
    #[arg(long, default_value_t = DEFAULT_NUM_QUEUES, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,
    /// Largest queue size accepted (a power of two up to 32768).
    #[arg(long, default_value_t = DEFAULT_QUEUE_SIZE)]
    pub queue_size: usize,
    /// The disk's serial (GET_ID, at most 20 bytes); default: from the VHDX virtual disk id.
    #[arg(long)]
    pub serial: Option<String>,
    /// The host page cache: `none` (O_DIRECT, the production setting), `writeback` or
    /// `writethrough` (every write flushed before it completes).
    #[arg(long, value_enum, default_value_t = CacheMode::Writeback)]
    pub cache: CacheMode,
    /// Same as `--cache writethrough`.
    #[arg(long, conflicts_with = "cache")]
    pub writethrough: bool,
    /// How queues run their data I/O. `auto` (the default): requests in flight at the guest's
    /// queue depth through io_uring, or through a thread pool where io_uring is missing or
    /// forbidden (old kernels, Docker's default seccomp profile); the log names the choice.
    /// `io_uring` or `threads` force one (io_uring that cannot start is an error); `off` runs
    /// one request at a time per queue (an escape hatch).
    #[arg(long, value_enum, default_value_t = AioMode::Auto, overrides_with = "aio")]
    pub aio: AioMode,
    /// After serving, a queue thread keeps looking for new requests and completions for up to
    /// this many microseconds before it sleeps, with the guest's kicks suppressed meanwhile;
    /// the window adapts to the load and an idle device never polls (0: never poll).
    #[arg(long, value_name = "N", default_value_t = crate::poll::DEFAULT_POLL_US,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub poll_us: u32,
    /// With `--aio off` only: threads that help a queue with large reads (default: one per
    /// core beyond the first; 0: each queue is served by its own thread alone).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=256))]
    pub helper_threads: Option<u16>,
    /// Tests only: the N-th asynchronous data read or write fails with EIO (`read:N`,
    /// `write:N`), as QEMU's blkdebug.
    #[arg(long, value_name = "KIND:N", hide = true)]
    pub debug_inject_eio: Option<String>,
    /// Confine the process once its files are open (see README "Sandbox"); off only to debug.
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    pub sandbox: OnOff,
    /// What a system call outside the sandbox's allowlists does.
    #[arg(long, value_enum, default_value_t = SeccompMode::Kill)]
    pub seccomp: SeccompMode,
    /// When started as root: run as this user (name or uid) once the files are open.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// With --user: run as this group (name or gid; default: the user's group).
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    #[command(flatten)]
    pub chain: ChainArgs,
    /// The image (the conventions' `--blk-file` is accepted too).
    #[arg(required_unless_present_any = ["blk_file", "print_capabilities"])]
    pub image: Option<PathBuf>,
    #[arg(long, value_name = "PATH", hide = true, conflicts_with = "image")]
    pub blk_file: Option<PathBuf>,
}

/// How long `serve` waits for the image's locks to be released before it gives up.
///
/// A back-end killed with SIGKILL and restarted at once by its supervisor can find its own
/// image still locked for a moment: the dead process's io_uring is torn down by the kernel
/// asynchronously, and operations it had in flight (and the io-wq workers running them) hold
/// references on the image's open file description, which owns the OFD locks, until then. A
/// lock held by a live process still fails, with the same message, once this has passed.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// [`Chain::open`], retried while a file of the chain is locked by someone else, for at most
/// `wait` (one log line when it starts waiting).
fn open_waiting_for_locks(
    image: &std::path::Path,
    options: &ChainOptions,
    wait: Duration,
) -> crate::vhdx::Result<Chain> {
    let deadline = std::time::Instant::now() + wait;
    let mut said = false;
    loop {
        match Chain::open(image, options) {
            Err(e) if is_lock_error(&e) && std::time::Instant::now() < deadline => {
                if !said {
                    log::warn!(
                        "{e}; waiting up to {} s for it to be released (a process killed just now can hold it for a moment)",
                        wait.as_secs()
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
            Ok(chain) => {
                if said {
                    log::info!("the image's locks were released; serving");
                }
                return Ok(chain);
            }
        }
    }
}

fn is_lock_error(e: &crate::vhdx::Error) -> bool {
    use crate::vhdx::{ChainError, Error};
    match e {
        Error::Locked(_) => true,
        Error::Chain(ChainError::Open { source, .. }) => is_lock_error(source),
        _ => false,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

const CAPABILITIES: &str = r#"{
  "type": "block",
  "features": [
    "blk-file",
    "read-only"
  ]
}"#;

pub fn run(args: ServeArgs) -> CliResult<ExitCode> {
    if args.print_capabilities {
        println!("{CAPABILITIES}");
        return Ok(ExitCode::SUCCESS);
    }
    if !args.queue_size.is_power_of_two() || !(2..=32768).contains(&args.queue_size) {
        return Err(format!(
            "--queue-size {} must be a power of two from 2 to 32768",
            args.queue_size
        )
        .into());
    }
    let image = args
        .image
        .clone()
        .or(args.blk_file.clone())
        .ok_or("an image is needed")?;
    let socket = match (&args.socket_path, args.fd) {
        (Some(p), _) => Socket::Path(p.clone()),
        (None, Some(fd)) => Socket::Fd(fd),
        (None, None) => return Err("--socket-path or --fd is needed".into()),
    };
    let sandbox = sandbox::Config {
        enabled: args.sandbox == OnOff::On,
        seccomp: args.seccomp,
        credentials: sandbox::privileges::resolve(args.user.as_deref(), args.group.as_deref())?,
        num_queues: args.num_queues,
    };
    let fault = args
        .debug_inject_eio
        .as_deref()
        .map(crate::io::fault::Plan::parse)
        .transpose()?;
    // The whole chain is opened (and locked) before serving: nothing is opened later, so a
    // sandbox can be put in place after this point.
    let chain_options = ChainOptions {
        direct: args.cache.direct(),
        ..args.chain.options(!args.read_only)
    };
    let chain = open_waiting_for_locks(&image, &chain_options, LOCK_WAIT)?;
    if let Some(d) = chain.leaf().storage().direct() {
        let a = d.align();
        log::info!(
            "--cache none: O_DIRECT, buffers aligned to {} bytes and file offsets to {} (else bounced)",
            a.mem,
            a.offset
        );
    }
    // Probed once here, so that the log names the choice and a forced io_uring that cannot
    // work fails before serving.
    let aio = match args.aio {
        AioMode::Off => {
            log::info!("data I/O: one request at a time per queue (--aio off)");
            None
        }
        mode => Some(crate::io::choose(mode.forced())?),
    };
    if aio.is_some() && args.helper_threads.is_some() {
        log::info!("--helper-threads is for --aio off; requests in flight need no helpers");
    }
    if let Some(plan) = fault {
        crate::io::fault::install(plan);
    }
    let serial = args.serial.clone().unwrap_or_else(|| {
        chain
            .leaf()
            .metadata
            .virtual_disk_id
            .simple()
            .to_string()
            .chars()
            .take(20)
            .collect()
    });
    let chain = Arc::new(chain);
    let options = DeviceOptions {
        read_only: args.read_only,
        num_queues: usize::from(args.num_queues),
        queue_size: args.queue_size,
        serial,
        writethrough: args.writethrough || args.cache == CacheMode::Writethrough,
        aio,
        poll: std::time::Duration::from_micros(u64::from(args.poll_us)),
        // Counted before the sandbox: the cgroup's CPU quota is read from /sys.
        helper_threads: args
            .helper_threads
            .map_or_else(default_helper_threads, usize::from),
    };
    let listener = daemon::listen(&socket)?;
    // Every file is open and the socket listens: confine the process before it starts a
    // thread (the helpers below, the signal and queue threads in `daemon::serve`, the I/O
    // workers) or reads a message.
    sandbox::enter(&sandbox)?;
    let device = Arc::new(BlockDevice::new(Arc::clone(&chain), options)?);
    log::info!(
        "serving {} ({} bytes, {} queues{})",
        image.display(),
        chain.virtual_size(),
        args.num_queues,
        if args.read_only { ", read-only" } else { "" }
    );
    let served = daemon::serve(device, listener, &socket);
    // Queue threads drop their references as they exit; wait for them, then close cleanly.
    let mut chain = chain;
    for _ in 0..500 {
        match Arc::try_unwrap(chain) {
            Ok(c) => {
                c.close()?;
                served?;
                return Ok(ExitCode::SUCCESS);
            }
            Err(still_shared) => {
                chain = still_shared;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    chain.flush()?;
    served?;
    Err("queue threads did not stop; the image was flushed but not closed cleanly".into())
}
