//! `compact [-p] FILE`: give back the space of blocks that hold only zeros and pack the rest
//! to the front of the file (Hyper-V's Optimize-VHD). The disk reads the same afterwards.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};

use super::{check_format, ChainArgs, CliResult};
use crate::vhdx::compact;
use crate::vhdx::Chain;

#[derive(clap::Args, Debug)]
pub struct CompactArgs {
    /// Image format; only vhdx.
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Show a progress bar (the default when stderr is a terminal).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Never show a progress bar.
    #[arg(short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
    pub file: PathBuf,
}

/// A percentage bar on stderr, or a hidden one.
pub fn progress_bar(show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(1);
    b.set_style(
        ProgressStyle::with_template("{bar:40} {percent:>3}% eta {eta}").expect("valid template"),
    );
    b
}

pub fn run(args: CompactArgs) -> CliResult<ExitCode> {
    check_format(&args.format, &["vhdx"])?;
    let chain = Chain::open(&args.file, &args.chain.options(true))?;
    let show = !args.quiet && (args.progress || std::io::stderr().is_terminal());
    let bar = progress_bar(show);
    let report = compact::compact(chain, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    println!(
        "{} blocks reclaimed, {} bitmap blocks freed, {} blocks moved; file {} -> {} bytes",
        report.blocks_reclaimed,
        report.bitmaps_freed,
        report.blocks_moved,
        report.old_len,
        report.new_len
    );
    Ok(ExitCode::SUCCESS)
}
