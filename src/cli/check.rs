//! `check [-r leaks|all] [--output=human|json] FILE`, with qemu-img's exit codes:
//! 0 clean, 1 the check could not be completed, 2 corruption found, 3 only leaks found.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;
use serde::Serialize;

use super::{check_format, ChainArgs, CliResult, OutputFormat};
use crate::vhdx::check::{self, CheckReport, Repair};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RepairArg {
    Leaks,
    All,
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Image format; only vhdx.
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Repair: `leaks` gives back unused space at the end of the file; `all` also replays a
    /// pending log.
    #[arg(short = 'r', value_enum)]
    pub repair: Option<RepairArg>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub chain: ChainArgs,
    pub file: PathBuf,
}

#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct JsonReport<'a> {
    filename: String,
    format: &'static str,
    check_errors: usize,
    corruptions: usize,
    leaks: usize,
    corruptions_fixed: usize,
    leaks_fixed: usize,
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    leaked_bytes: u64,
    unused_bytes: u64,
    corruption_details: &'a [String],
    notes: &'a [String],
}

pub fn exit_code(r: &CheckReport) -> u8 {
    if r.check_errors > 0 {
        1
    } else if !r.corruptions.is_empty() {
        2
    } else if !r.leaks.is_empty() {
        3
    } else {
        0
    }
}

fn print_human(r: &CheckReport) {
    for c in &r.corruptions {
        println!("ERROR {c}");
    }
    for (offset, len) in &r.leaks {
        println!("Leaked space: {len} bytes at offset {offset:#x}");
    }
    for n in &r.notes {
        println!("Note: {n}");
    }
    if r.check_errors > 0 {
        println!("The check could not be completed.");
        return;
    }
    if r.corruptions_fixed > 0 || r.leaks_fixed > 0 {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    if r.corruptions.is_empty() && r.leaks.is_empty() {
        println!("No errors were found on the image.");
    }
    if !r.corruptions.is_empty() {
        println!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
            r.corruptions.len()
        );
    }
    if !r.leaks.is_empty() {
        println!(
            "\n{} leaked extents ({} bytes) were found on the image.\nThis means waste of disk space, but no harm to data.",
            r.leaks.len(),
            r.leaked_bytes()
        );
    }
    if r.total_blocks > 0 {
        println!(
            "{}/{} = {:.2}% allocated",
            r.allocated_blocks,
            r.total_blocks,
            r.allocated_blocks as f64 * 100.0 / r.total_blocks as f64
        );
    }
    if r.image_end_offset > 0 {
        println!("Image end offset: {}", r.image_end_offset);
    }
}

pub fn run(args: CheckArgs) -> CliResult<ExitCode> {
    check_format(&args.format, &["vhdx"])?;
    let repair = match args.repair {
        None => Repair::None,
        Some(RepairArg::Leaks) => Repair::Leaks,
        Some(RepairArg::All) => Repair::All,
    };
    // A file that cannot be opened at all (missing, unreadable, a directory) is not a check
    // result: one line on stderr and exit 1, as qemu-img does.
    let opened = std::fs::File::open(&args.file).and_then(|f| f.metadata());
    match opened {
        Err(e) => return Err(format!("cannot open {}: {e}", args.file.display()).into()),
        Ok(m) if m.is_dir() => {
            return Err(format!("cannot open {}: is a directory", args.file.display()).into())
        }
        Ok(_) => {}
    }
    let r = check::check(&args.file, repair, &args.chain.parents);
    // Opening failed for a reason that says nothing about the image (a lock, an I/O error):
    // no report to print, one line on stderr and exit 1, as qemu-img does.
    if r.check_errors > 0 && r.corruptions.is_empty() && r.total_blocks == 0 {
        return Err(format!(
            "cannot check {}: {}",
            args.file.display(),
            r.notes.join("; ")
        )
        .into());
    }
    match args.output {
        OutputFormat::Human => print_human(&r),
        OutputFormat::Json => {
            let j = JsonReport {
                filename: r.filename.display().to_string(),
                format: "vhdx",
                check_errors: r.check_errors,
                corruptions: r.corruptions.len(),
                leaks: r.leaks.len(),
                corruptions_fixed: r.corruptions_fixed,
                leaks_fixed: r.leaks_fixed,
                image_end_offset: r.image_end_offset,
                total_clusters: r.total_blocks,
                allocated_clusters: r.allocated_blocks,
                leaked_bytes: r.leaked_bytes(),
                unused_bytes: r.unused_bytes,
                corruption_details: &r.corruptions,
                notes: &r.notes,
            };
            println!("{}", serde_json::to_string_pretty(&j)?);
        }
    }
    Ok(ExitCode::from(exit_code(&r)))
}
