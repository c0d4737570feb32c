//! `convert [-O raw] [-p] IN OUT`: stream an image (a whole differencing chain) into a raw file.
//!
//! The output is sparse wherever the disk reads zeros: runs the chain knows to be zero are never
//! read, and data that turns out to be zero is skipped too. The output is written under a
//! temporary name and renamed into place only when complete and flushed, so a failed convert
//! never leaves a half-written OUT (and an existing OUT is untouched until the end).

use std::fs::{File, OpenOptions};
use std::io::IsTerminal;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};

use super::{check_format, ChainArgs, CliResult};
use crate::vhdx::{Chain, Extent, ReadSource};

/// Bytes read and written per step.
const CHUNK: u64 = 4 << 20;
/// Granularity of zero detection inside data: a zero run this long becomes a hole.
const ZERO_GRAIN: usize = 64 << 10;

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Input format; only vhdx.
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Output format: raw.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    pub output_format: String,
    /// Show a progress bar (the default when stderr is a terminal).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Never show a progress bar.
    #[arg(short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
    pub input: PathBuf,
    pub output: PathBuf,
}

pub fn run(args: ConvertArgs) -> CliResult<ExitCode> {
    check_format(&args.format, &["vhdx"])?;
    if args.output_format != "raw" {
        return Err(format!(
            "output format {:?} is not supported (raw)",
            args.output_format
        )
        .into());
    }
    let chain = Chain::open(&args.input, &args.chain.options(false))?;
    refuse_overwriting_the_chain(&chain, &args.output)?;
    let show = !args.quiet && (args.progress || std::io::stderr().is_terminal());
    write_atomically(&args.output, |out| to_raw(&chain, out, show))?;
    Ok(ExitCode::SUCCESS)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn refuse_overwriting_the_chain(chain: &Chain, output: &Path) -> CliResult<()> {
    for layer in chain.layers() {
        if same_file(layer.path(), output) {
            return Err(format!("output {} is part of the input chain", output.display()).into());
        }
    }
    Ok(())
}

/// Writes `path` through a temporary file in the same directory, renamed over `path` when
/// `write` succeeded and the data is durable.
pub fn write_atomically(path: &Path, write: impl FnOnce(&File) -> CliResult<()>) -> CliResult<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| format!("{} is not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.writing-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> CliResult<()> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        write(&file)?;
        file.sync_all()
            .map_err(|e| format!("flushing {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn to_raw(chain: &Chain, out: &File, show_progress: bool) -> CliResult<()> {
    let size = chain.virtual_size();
    let bar = if show_progress {
        let b = ProgressBar::new(size);
        b.set_style(
            ProgressStyle::with_template(
                "{bar:40} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    out.set_len(size)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut extents: Vec<Extent> = Vec::new();
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(CHUNK);
        extents.clear();
        chain.resolve(offset, n, &mut extents)?;
        // Known-zero runs are left as holes without reading anything.
        if extents.iter().all(|e| e.source == ReadSource::Zero) {
            offset += n;
            bar.set_position(offset);
            continue;
        }
        let data = &mut buf[..n as usize];
        chain.read_at(data, offset)?;
        for (i, grain) in data.chunks(ZERO_GRAIN).enumerate() {
            if grain.iter().any(|&b| b != 0) {
                out.write_all_at(grain, offset + (i * ZERO_GRAIN) as u64)?;
            }
        }
        offset += n;
        bar.set_position(offset);
    }
    bar.finish_and_clear();
    Ok(())
}
