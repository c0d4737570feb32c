//! `rebase -u -b NEW_PARENT [--force] CHILD`: point a differencing child at its parent's new
//! place (qemu-img's unsafe rebase: no data is copied). The new parent must be the same disk,
//! i.e. have the DataWriteGuid the child records, unless `--force`.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{check_format, CliResult};
use crate::vhdx::rebase::rebase;

#[derive(clap::Args, Debug)]
pub struct RebaseArgs {
    /// Image format; only vhdx.
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Unsafe rebase: only rewrite the parent locator (the only mode there is; required).
    #[arg(short = 'u')]
    pub unsafe_mode: bool,
    /// The new parent.
    #[arg(short = 'b', value_name = "NEW_PARENT")]
    pub base: PathBuf,
    /// Relink even if the new parent's DataWriteGuid is not the one the child expects.
    #[arg(long)]
    pub force: bool,
    pub child: PathBuf,
}

pub fn run(args: RebaseArgs) -> CliResult<ExitCode> {
    check_format(&args.format, &["vhdx"])?;
    if !args.unsafe_mode {
        return Err(
            "only rebase -u is supported (rewrite the parent locator; no data is copied)".into(),
        );
    }
    if args.base.as_os_str().is_empty() {
        return Err("rebase -b \"\" (detaching a child from its parent) is not supported".into());
    }
    rebase(&args.child, &args.base, args.force)?;
    Ok(ExitCode::SUCCESS)
}
