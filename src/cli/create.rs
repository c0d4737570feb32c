//! `create [-o OPTIONS] [-b PARENT] FILE [SIZE]`

use std::path::PathBuf;
use std::process::ExitCode;

use super::options::{parse_option_list, parse_size};
use super::{check_format, CliResult};
use crate::vhdx::create::{self, CreateOptions, Subformat};

const OPTION_HELP: &str = "Supported options:
  size=SIZE                  virtual disk size (k, M, G, T suffixes)
  subformat=dynamic|fixed    dynamic (default) allocates blocks on first write; fixed allocates every block now
  block_size=SIZE            payload block size, a power of two from 1M to 256M (default 32M, or the parent's)
  log_size=SIZE              log size, a multiple of 1M (default 1M)
  logical_sector_size=512|4096   sector size the guest sees (default 512, or the parent's)
  physical_sector_size=512|4096  physical sector size reported to the guest (default 4096)";

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Image format; only vhdx.
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Options, comma-separated (`-o help` lists them); may be repeated.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Make a differencing image over this parent.
    #[arg(short = 'b', long = "backing", value_name = "PARENT")]
    pub parent: Option<PathBuf>,
    /// Format of the parent; only vhdx.
    #[arg(short = 'F', value_name = "FMT")]
    pub parent_format: Option<String>,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The new image; it must not exist. (Not needed with `-o help`.)
    #[arg(required_unless_present = "options")]
    pub file: Option<PathBuf>,
    /// Virtual size (k, M, G, T suffixes); defaults to the parent's.
    pub size: Option<String>,
}

/// Applies `-o` option lists (as `create` and `convert -O vhdx` take them) to `o`.
pub fn apply_options(o: &mut CreateOptions, lists: &[String]) -> CliResult<()> {
    let u32_size = |k: &str, v: &str| -> CliResult<u32> {
        let n = parse_size(v)?;
        u32::try_from(n).map_err(|_| format!("{k}={v} is too large").into())
    };
    for list in lists {
        for (k, v) in parse_option_list(list)? {
            match k.as_str() {
                "help" | "?" => return Err(OPTION_HELP.into()),
                "size" => o.virtual_size = Some(parse_size(&v)?),
                "block_size" => o.block_size = Some(u32_size(&k, &v)?).filter(|&b| b != 0),
                "log_size" => o.log_size = Some(parse_size(&v)?),
                "logical_sector_size" => o.logical_sector_size = Some(u32_size(&k, &v)?),
                "physical_sector_size" => o.physical_sector_size = Some(u32_size(&k, &v)?),
                "subformat" => {
                    o.subformat = match v.as_str() {
                        "dynamic" => Subformat::Dynamic,
                        "fixed" => Subformat::Fixed,
                        _ => return Err(format!("subformat={v}: expected dynamic or fixed").into()),
                    }
                }
                _ => return Err(format!("unknown option {k:?} (try -o help)").into()),
            }
        }
    }
    Ok(())
}

impl TryFrom<&CreateArgs> for CreateOptions {
    type Error = super::CliError;

    fn try_from(a: &CreateArgs) -> CliResult<CreateOptions> {
        check_format(&a.format, &["vhdx"])?;
        check_format(&a.parent_format, &["vhdx"])?;
        let mut o = CreateOptions {
            parent: a.parent.clone(),
            ..Default::default()
        };
        if let Some(s) = &a.size {
            o.virtual_size = Some(parse_size(s)?);
        }
        apply_options(&mut o, &a.options)?;
        if o.virtual_size.is_none() && o.parent.is_none() {
            return Err("a size is needed (or -b PARENT to take the parent's)".into());
        }
        Ok(o)
    }
}

pub fn run(args: CreateArgs) -> CliResult<ExitCode> {
    if args.options.iter().any(|o| o == "help" || o == "?") {
        println!("{OPTION_HELP}");
        return Ok(ExitCode::SUCCESS);
    }
    let file = args.file.as_deref().ok_or("a file name is needed")?;
    let options = CreateOptions::try_from(&args)?;
    create::create(file, &options)?;
    if !args.quiet {
        let f = crate::vhdx::VhdxFile::open(file, false)?;
        let mut line = format!(
            "Formatting '{}', fmt=vhdx size={} block_size={} log_size={} logical_sector_size={} subformat={}",
            file.display(),
            f.virtual_size(),
            f.metadata.block_size,
            f.headers.current.log_length,
            f.logical_sector_size(),
            super::info::subformat(&f)
        );
        if let Some(p) = &args.parent {
            line.push_str(&format!(" backing_file={}", p.display()));
        }
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}
