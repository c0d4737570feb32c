//! `compact [-p] FILE`: give back the space of blocks that hold only zeros and pack the rest
//! to the front of the file (Hyper-V's Optimize-VHD). The disk reads the same afterwards.

use std::path::PathBuf;
use std::process::ExitCode;

use super::progress::{ProgressArgs, Unit};
use super::{check_format, ChainArgs, CliResult};
use crate::vhdx::compact;
use crate::vhdx::Chain;

#[derive(clap::Args, Debug)]
pub struct CompactArgs {
    /// Image format; only vhdx.
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    #[command(flatten)]
    pub progress: ProgressArgs,
    #[command(flatten)]
    pub chain: ChainArgs,
    pub file: PathBuf,
}

pub fn run(args: CompactArgs) -> CliResult<ExitCode> {
    check_format(&args.format, &["vhdx"])?;
    let chain = Chain::open(&args.file, &args.chain.options(true))?;
    let bar = args.progress.bar(Unit::Steps);
    let report = compact::compact(chain, &mut |done, total| bar.update(done, total));
    bar.finish();
    let report = report?;
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
