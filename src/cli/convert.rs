//! `convert [-f raw|vhdx] [-O raw|vhdx] [-o OPTIONS] [-p] IN OUT`: copy an image into a new
//! raw file or a new VHDX (a whole differencing chain is flattened).
//!
//! Zeros are never written: runs the input knows to be zero (holes of a raw file, zero runs of
//! a chain) are not even read, and data that turns out to be zero is skipped too, so a raw
//! output is sparse and a dynamic VHDX output leaves all-zero blocks unallocated. The output is
//! written under a temporary name and renamed into place only when complete and flushed: a
//! failed convert never leaves a half-written OUT, and an existing OUT is untouched until then.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::create::apply_options;
use super::progress::{ProgressArgs, Unit};
use super::{check_format, CacheMode, ChainArgs, CliResult};
use crate::vhdx::create::{self, CreateOptions};
use crate::vhdx::{Chain, ChainOptions, Extents, ReadSource};

/// Bytes read and written per step.
const CHUNK: u64 = 4 << 20;
/// Granularity of zero detection inside data: a zero run this long is not written.
const ZERO_GRAIN: usize = 64 << 10;

#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Input format: vhdx (default) or raw.
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Output format: raw (default) or vhdx.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    pub output_format: String,
    /// Options of a vhdx output, as for `create` (`-o help` lists them).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    #[command(flatten)]
    pub progress: ProgressArgs,
    /// The host page cache for reading a vhdx input, as qemu-img's `-T`: `none` reads with
    /// O_DIRECT, so a large conversion does not fill the page cache.
    #[arg(short = 'T', value_enum, value_name = "SRC_CACHE")]
    pub src_cache: Option<CacheMode>,
    #[command(flatten)]
    pub chain: ChainArgs,
    pub input: PathBuf,
    pub output: PathBuf,
}

enum Input {
    Vhdx(Chain),
    Raw { file: File, size: u64 },
}

impl Input {
    /// A VHDX unless `-f raw` says otherwise: a damaged VHDX must be refused, not copied as
    /// if it were a raw disk.
    fn open(
        path: &Path,
        format: Option<&str>,
        chain: &ChainArgs,
        direct: bool,
    ) -> CliResult<Input> {
        let format = format.unwrap_or("vhdx");
        match format {
            "vhdx" => {
                let options = ChainOptions {
                    direct,
                    ..chain.options(false)
                };
                Ok(Input::Vhdx(Chain::open(path, &options)?))
            }
            "raw" if direct => Err("-T none applies to a vhdx input only".into()),
            "raw" => {
                let file =
                    File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                let meta = file.metadata()?;
                if !meta.is_file() {
                    return Err(format!("{} is not a regular file", path.display()).into());
                }
                Ok(Input::Raw {
                    size: meta.len(),
                    file,
                })
            }
            other => Err(format!("input format {other:?} is not supported (vhdx, raw)").into()),
        }
    }

    fn size(&self) -> u64 {
        match self {
            Input::Vhdx(c) => c.virtual_size(),
            Input::Raw { size, .. } => *size,
        }
    }

    /// Whether `[offset, offset + len)` is known to read as zeros without reading it.
    fn known_zero(&self, offset: u64, len: u64, extents: &mut Extents) -> CliResult<bool> {
        match self {
            Input::Vhdx(chain) => {
                extents.clear();
                chain.resolve(offset, len, extents)?;
                Ok(extents.iter().all(|e| e.source == ReadSource::Zero))
            }
            Input::Raw { file, size } => {
                if offset >= *size {
                    return Ok(true);
                }
                // The next data at or after `offset`; ENXIO means none. Filesystems without
                // hole reporting say "data here", which is still correct.
                match nix::unistd::lseek(file.as_fd(), offset as i64, nix::unistd::Whence::SeekData)
                {
                    Ok(next) => Ok(next as u64 >= offset + len),
                    Err(nix::errno::Errno::ENXIO) => Ok(true),
                    Err(_) => Ok(false),
                }
            }
        }
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> CliResult<()> {
        match self {
            Input::Vhdx(chain) => chain.read_at(buf, offset)?,
            Input::Raw { file, .. } => {
                crate::vhdx::Storage::read_at(file, buf, offset)?;
            }
        }
        Ok(())
    }

    fn layers(&self) -> Vec<PathBuf> {
        match self {
            Input::Vhdx(c) => c.layers().iter().map(|l| l.path().to_path_buf()).collect(),
            Input::Raw { .. } => Vec::new(),
        }
    }
}

/// Where the converted bytes go.
trait Output {
    fn write(&mut self, data: &[u8], offset: u64) -> CliResult<()>;
}

struct RawOutput<'a>(&'a File);

impl Output for RawOutput<'_> {
    fn write(&mut self, data: &[u8], offset: u64) -> CliResult<()> {
        Ok(self.0.write_all_at(data, offset)?)
    }
}

struct VhdxOutput(Chain);

impl Output for VhdxOutput {
    fn write(&mut self, data: &[u8], offset: u64) -> CliResult<()> {
        // The end of a raw input need not be a whole sector: pad it with zeros.
        let sector = self.0.logical_sector_size() as usize;
        if data.len() % sector == 0 {
            return Ok(self.0.write_at(data, offset)?);
        }
        let mut padded = data.to_vec();
        padded.resize(data.len().div_ceil(sector) * sector, 0);
        Ok(self.0.write_at(&padded, offset)?)
    }
}

pub fn run(args: ConvertArgs) -> CliResult<ExitCode> {
    check_format(&args.format, &["vhdx", "raw"])?;
    check_format(&Some(args.output_format.clone()), &["raw", "vhdx"])?;
    let mut vhdx_options = CreateOptions::default();
    apply_options(&mut vhdx_options, &args.options)?;
    if !args.options.is_empty() && args.output_format != "vhdx" {
        return Err("-o options apply only to -O vhdx".into());
    }
    let direct = args.src_cache.is_some_and(CacheMode::direct);
    let input = Input::open(&args.input, args.format.as_deref(), &args.chain, direct)?;
    for layer in std::iter::once(args.input.clone()).chain(input.layers()) {
        if same_file(&layer, &args.output) {
            return Err(format!(
                "output {} is part of the input chain",
                args.output.display()
            )
            .into());
        }
    }
    let progress = args.progress;
    if args.output_format == "raw" {
        write_atomically(&args.output, |tmp| {
            let out = OpenOptions::new().write(true).create_new(true).open(tmp)?;
            out.set_len(input.size())?;
            copy(&input, &mut RawOutput(&out), progress)?;
            out.sync_all()?;
            Ok(())
        })?;
    } else {
        vhdx_options.virtual_size = Some(input.size());
        write_atomically(&args.output, |tmp| {
            create::create(tmp, &vhdx_options)?;
            let chain = Chain::open(
                tmp,
                &ChainOptions {
                    writable: true,
                    ..Default::default()
                },
            )?;
            let mut out = VhdxOutput(chain);
            copy(&input, &mut out, progress)?;
            out.0.close()?;
            Ok(())
        })?;
    }
    Ok(ExitCode::SUCCESS)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Writes `path` through a temporary file in the same directory, renamed over `path` when
/// `write` succeeded (and made its data durable).
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> CliResult<()>) -> CliResult<()> {
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
    let result = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path)
            .map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), path.display()).into())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn copy(input: &Input, out: &mut dyn Output, progress: ProgressArgs) -> CliResult<()> {
    let size = input.size();
    let bar = progress.bar(Unit::Bytes);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut extents = Extents::new();
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(CHUNK);
        if !input.known_zero(offset, n, &mut extents)? {
            let data = &mut buf[..n as usize];
            input.read(data, offset)?;
            for (i, grain) in data.chunks(ZERO_GRAIN).enumerate() {
                if grain.iter().any(|&b| b != 0) {
                    out.write(grain, offset + (i * ZERO_GRAIN) as u64)?;
                }
            }
        }
        offset += n;
        bar.update(offset, size);
    }
    bar.finish();
    Ok(())
}
