//! `resize [--shrink] [--force] [-p] FILE [+|-]SIZE`: change a VHDX's virtual size, as
//! `qemu-img resize` does for the formats it can resize (it cannot resize VHDX).
//!
//! Growing is always allowed; shrinking needs `--shrink` (qemu-img's rule), and is refused
//! while data lies past the new end unless `--force`. The engine's resize is crash-safe: the
//! file is the old disk or the new one whatever happens.

use std::path::PathBuf;
use std::process::ExitCode;

use super::options::parse_size;
use super::progress::{ProgressArgs, Unit};
use super::{check_format, ChainArgs, CliResult};
use crate::vhdx::resize::{self, ResizeOptions};
use crate::vhdx::Chain;

#[derive(clap::Args, Debug)]
pub struct ResizeArgs {
    /// Image format; only vhdx.
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Allow the size to go down (data past the new end is lost).
    #[arg(long)]
    pub shrink: bool,
    /// With --shrink: discard data that lies past the new end instead of refusing.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub progress: ProgressArgs,
    #[command(flatten)]
    pub chain: ChainArgs,
    pub file: PathBuf,
    /// The new size (`10G`), or a change of size (`+1G`, `-512M`).
    #[arg(allow_hyphen_values = true)]
    pub size: String,
}

/// The new size from `[+|-]SIZE` and the current size.
pub fn new_size(spec: &str, current: u64) -> Result<u64, String> {
    let (sign, rest) = match spec.as_bytes().first() {
        Some(b'+') => (1, &spec[1..]),
        Some(b'-') => (-1, &spec[1..]),
        _ => (0, spec),
    };
    let n = parse_size(rest)?;
    match sign {
        1 => current
            .checked_add(n)
            .ok_or_else(|| format!("size {spec:?} is too large")),
        -1 => current
            .checked_sub(n)
            .filter(|&s| s > 0)
            .ok_or_else(|| format!("size {spec:?} would leave nothing of the disk")),
        _ => Ok(n),
    }
}

pub fn run(args: ResizeArgs) -> CliResult<ExitCode> {
    check_format(&args.format, &["vhdx"])?;
    let chain = Chain::open(&args.file, &args.chain.options(true))?;
    let old = chain.virtual_size();
    let size = new_size(&args.size, old)?;
    let bar = args.progress.bar(Unit::Steps);
    let options = ResizeOptions {
        shrink: args.shrink,
        force: args.force,
    };
    let report = resize::resize(chain, size, &options, &mut |done, total| {
        bar.update(done, total)
    });
    bar.finish();
    let report = report?;
    if report.old_size == report.new_size {
        println!("Image already has size {}", report.new_size);
    } else {
        println!(
            "Image resized from {} to {}.",
            report.old_size, report.new_size
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_and_absolute_sizes() {
        assert_eq!(new_size("2G", 1 << 30), Ok(2 << 30));
        assert_eq!(new_size("+1G", 1 << 30), Ok(2 << 30));
        assert_eq!(new_size("-512M", 1 << 30), Ok(512 << 20));
        assert!(new_size("-1G", 1 << 30).is_err());
        assert!(new_size("+", 1 << 30).is_err());
    }
}
