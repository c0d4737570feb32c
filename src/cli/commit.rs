//! `commit [-b BASE] [-d] [-p] [--force] CHILD`: merge a differencing child into its parent, or
//! every level of its chain down to BASE (Hyper-V's Merge-VHD). Crash-safe at every instant: an
//! interrupted commit leaves a chain that reads as before, and running it again finishes it
//! (see `crate::vhdx::commit`).

use std::path::PathBuf;
use std::process::ExitCode;

use super::progress::{ProgressArgs, Unit};
use super::{check_format, ChainArgs, CliResult};
use crate::vhdx::commit::{commit_files, CommitOptions};

#[derive(clap::Args, Debug)]
pub struct CommitArgs {
    /// Image format; only vhdx.
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Commit every level down to this ancestor (default: the parent).
    #[arg(short = 'b', value_name = "BASE")]
    pub base: Option<PathBuf>,
    /// Keep CHILD, emptied, as a child of the new parent (default: remove it).
    #[arg(short = 'd')]
    pub keep: bool,
    #[command(flatten)]
    pub progress: ProgressArgs,
    /// Commit even though another child of a level that changes was found beside the chain
    /// (that child will read wrong data afterwards).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
    pub child: PathBuf,
}

pub fn run(args: CommitArgs) -> CliResult<ExitCode> {
    check_format(&args.format, &["vhdx"])?;
    let bar = args.progress.bar(Unit::Bytes);
    let mut progress = |done: u64, total: u64| bar.update(done, total);
    let report = commit_files(
        &args.child,
        args.base.as_deref(),
        &args.chain.parents,
        args.force,
        &CommitOptions {
            keep_top: args.keep,
        },
        &mut progress,
    );
    bar.finish();
    let report = report?;
    println!("Image committed into {}.", report.target.display());
    for p in &report.removed {
        println!("Removed {}.", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
