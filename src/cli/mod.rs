//! The command line: one module per subcommand, in the style of `qemu-img` so that users'
//! habits and scripts carry over.

pub mod check;
pub mod convert;
pub mod create;
pub mod info;
pub mod options;

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
    /// Create a new VHDX: dynamic, fixed, or differencing over a parent (-b).
    Create(create::CreateArgs),
    /// Show the facts of an image and its parent chain.
    Info(info::InfoArgs),
    /// Validate every structure of an image; report corruption and leaked space.
    Check(check::CheckArgs),
    /// Copy an image (a whole differencing chain) to a raw file, sparse where it reads zeros.
    Convert(convert::ConvertArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    #[default]
    Human,
    Json,
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
        Command::Create(a) => create::run(a),
        Command::Info(a) => info::run(a),
        Command::Check(a) => check::run(a),
        Command::Convert(a) => convert::run(a),
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
            let rendered = e.render().to_string();
            let first = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("vhost-user-vhdx: {first} (see --help)");
            ExitCode::FAILURE
        }
    }
}
