//! The command line: one module per subcommand, in the style of `qemu-img` so that users'
//! habits and scripts carry over.

pub mod check;
pub mod commit;
pub mod compact;
pub mod convert;
pub mod create;
pub mod info;
pub mod io;
pub mod options;
pub mod progress;
pub mod rebase;
pub mod resize;
pub mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

pub type CliError = Box<dyn std::error::Error + Send + Sync>;
pub type CliResult<T> = Result<T, CliError>;

#[derive(Parser, Debug)]
#[command(
    name = "vhost-user-vhdx",
    version,
    about = "Serve VHDX disks to virtual machines over vhost-user-blk, and the image tools around it",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve an image (a whole differencing chain) to a VMM over vhost-user-blk.
    Serve(serve::ServeArgs),
    /// Create a new VHDX: dynamic, fixed, or differencing over a parent (-b).
    Create(create::CreateArgs),
    /// Show the facts of an image and its parent chain.
    Info(info::InfoArgs),
    /// Validate every structure of an image; report corruption and leaked space.
    Check(check::CheckArgs),
    /// Copy an image (a whole differencing chain) into a new raw file or VHDX, skipping zeros.
    Convert(convert::ConvertArgs),
    /// Run qemu-io style commands (write, read, discard, flush) on an image.
    Io(io::IoArgs),
    /// Change the virtual size of an image (growing; shrinking with --shrink).
    Resize(resize::ResizeArgs),
    /// Give back the space of all-zero blocks and pack the file (the disk reads the same).
    Compact(compact::CompactArgs),
    /// Merge a differencing child into its parent (or every level down to -b BASE).
    Commit(commit::CommitArgs),
    /// Point a differencing child at its parent's new place (-u: the locator only).
    Rebase(rebase::RebaseArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    #[default]
    Human,
    Json,
}

/// How image files use the host page cache, named as QEMU names its `cache=` modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum CacheMode {
    /// O_DIRECT: no host page cache (the guest's own cache is its only one); writes complete
    /// when they reach the disk's write cache, and FLUSH makes them durable.
    None,
    /// The host page cache holds reads and writes; FLUSH makes writes durable.
    #[default]
    Writeback,
    /// The host page cache, and every write is flushed before it completes.
    Writethrough,
}

impl CacheMode {
    /// Whether files are opened with O_DIRECT.
    pub fn direct(self) -> bool {
        self == CacheMode::None
    }
}

/// Options shared by the commands that open an existing chain.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ChainArgs {
    /// Where a moved parent now is: the first --parent replaces the leaf's parent, the second
    /// the grandparent, and so on. The parent's identity is still checked.
    #[arg(long = "parent", value_name = "PATH")]
    pub parents: Vec<PathBuf>,
}

impl ChainArgs {
    pub fn options(&self, writable: bool) -> crate::vhdx::ChainOptions {
        crate::vhdx::ChainOptions {
            writable,
            parent_overrides: self.parents.clone(),
            force_share: false,
            direct: false,
        }
    }
}

/// qemu-img's `-f FMT`: only `vhdx` names what these commands read.
pub fn check_format(format: &Option<String>, allowed: &[&str]) -> CliResult<()> {
    match format {
        Some(f) if !allowed.contains(&f.as_str()) => Err(format!(
            "format {f:?} is not supported here (expected {})",
            allowed.join(" or ")
        )
        .into()),
        _ => Ok(()),
    }
}

pub fn run(cli: Cli) -> CliResult<ExitCode> {
    match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Create(a) => create::run(a),
        Command::Info(a) => info::run(a),
        Command::Check(a) => check::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Io(a) => io::run(a),
        Command::Resize(a) => resize::run(a),
        Command::Compact(a) => compact::run(a),
        Command::Commit(a) => commit::run(a),
        Command::Rebase(a) => rebase::run(a),
    }
}

/// An error and its causes on one line.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        source = cause.source();
    }
    s.replace('\n', " ")
}

/// clap's errors are several lines; bad input gets one line and exit status 1 (as qemu-img).
pub fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            eprintln!("vhost-user-vhdx: {} (see --help)", first_paragraph(&e));
            ExitCode::FAILURE
        }
    }
}

/// The first paragraph of clap's message on one line: for missing arguments the names are on
/// the lines after "the following required arguments were not provided:", so taking only the
/// first line lost them.
fn first_paragraph(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let lines: Vec<&str> = rendered
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let text = lines.join(" ");
    let text = text.trim_start_matches("error: ");
    if text.is_empty() {
        "invalid arguments".into()
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_name_the_missing_arguments() {
        let e = Cli::try_parse_from(["vhost-user-vhdx", "convert", "in.vhdx"]).unwrap_err();
        let line = first_paragraph(&e);
        assert!(line.contains("<OUTPUT>"), "{line}");
        assert!(!line.contains('\n') && !line.contains("Usage"), "{line}");
        let e = Cli::try_parse_from(["vhost-user-vhdx", "info", "--bogus", "x"]).unwrap_err();
        assert!(first_paragraph(&e).contains("--bogus"));
    }
}
