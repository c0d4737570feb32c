//! `commit [-b BASE] [-d] [-p] [--force] CHILD`: merge a differencing child into its parent, or
//! every level of its chain down to BASE (Hyper-V's Merge-VHD). Crash-safe at every instant: an
//! interrupted commit leaves a chain that reads as before, and running it again finishes it
//! (see `crate::vhdx::commit`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};

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
    /// Show a progress bar (the default when stderr is a terminal).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Never show a progress bar.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Commit even though another child of a level that changes was found beside the chain
    /// (that child will read wrong data afterwards).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
    pub child: PathBuf,
}

/// A progress bar for `total` bytes, in `convert`'s style, or a hidden one.
pub fn progress_bar(total: u64, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(total);
    b.set_style(
        ProgressStyle::with_template(
            "{bar:40} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    b
}

pub fn run(args: CommitArgs) -> CliResult<ExitCode> {
    check_format(&args.format, &["vhdx"])?;
    let show = !args.quiet && (args.progress || std::io::stderr().is_terminal());
    let bar = progress_bar(0, show);
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
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
    bar.finish_and_clear();
    let report = report?;
    println!("Image committed into {}.", report.target.display());
    for p in &report.removed {
        println!("Removed {}.", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
