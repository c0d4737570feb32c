//! `info [--output=human|json] FILE`: field names follow `qemu-img info --output json` where
//! they overlap; the VHDX facts go under `format-specific`.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

use super::{check_format, ChainArgs, CliResult, OutputFormat};
use crate::vhdx::{Chain, LogState, VhdxFile};

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// Image format; only vhdx.
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Show every file of the chain in full (JSON: an array, leaf first).
    #[arg(long)]
    pub backing_chain: bool,
    #[command(flatten)]
    pub chain: ChainArgs,
    pub file: PathBuf,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    pub format: &'static str,
    pub virtual_size: u64,
    pub actual_size: u64,
    pub cluster_size: u32,
    pub dirty_flag: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<&'static str>,
    pub format_specific: FormatSpecific,
}

#[derive(Serialize, Debug)]
pub struct FormatSpecific {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub data: VhdxFacts,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
pub struct VhdxFacts {
    pub subformat: &'static str,
    pub block_size: u32,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub file_size: u64,
    pub creator: String,
    pub virtual_disk_id: String,
    pub file_write_guid: String,
    pub data_write_guid: String,
    pub log: LogFacts,
    pub block_states: BTreeMap<&'static str, u64>,
    pub sector_bitmap_blocks: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_locator: Option<BTreeMap<String, String>>,
    /// The chain, leaf first (just this file when it has no parent).
    pub chain: Vec<String>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "kebab-case")]
pub struct LogFacts {
    pub offset: u64,
    pub length: u32,
    pub guid: String,
    /// clean, replayed, or dirty (replayed in memory only: the file still needs a writable open
    /// or `check -r all`).
    pub state: &'static str,
    pub replayed_entries: usize,
}

/// The subformat as `info` and `create` print it: differencing, fixed or dynamic.
pub fn subformat(f: &VhdxFile) -> &'static str {
    if f.is_differencing() {
        "differencing"
    } else if f.metadata.leave_block_allocated {
        "fixed"
    } else {
        "dynamic"
    }
}

fn abs(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// The facts of layer `i` of a chain.
pub fn image_info(chain: &Chain, i: usize) -> ImageInfo {
    let layers = chain.layers();
    let f = &layers[i];
    let meta = std::fs::metadata(f.path()).ok();
    let (log_state, entries) = match f.log_state {
        LogState::Clean => ("clean", 0),
        LogState::Replayed { entries } => ("replayed", entries),
        LogState::ReplayedInMemory { entries } => ("dirty", entries),
    };
    let g = f.geometry();
    let sb_present = (0..if g.has_parent {
        g.sector_bitmap_blocks()
    } else {
        0
    })
        .filter(|&c| f.bat.bitmap(c).state_bits() != 0)
        .count() as u64;
    let parent = layers.get(i + 1);
    let h = &f.headers.current;
    ImageInfo {
        filename: f.path().display().to_string(),
        format: "vhdx",
        virtual_size: f.virtual_size(),
        actual_size: meta.as_ref().map_or(0, |m| m.blocks() * 512),
        cluster_size: f.metadata.block_size,
        dirty_flag: matches!(f.log_state, LogState::ReplayedInMemory { .. }),
        backing_filename: parent.map(|p| p.path().display().to_string()),
        full_backing_filename: parent.map(|p| abs(p.path())),
        backing_filename_format: parent.map(|_| "vhdx"),
        format_specific: FormatSpecific {
            kind: "vhdx",
            data: VhdxFacts {
                subformat: subformat(f),
                block_size: f.metadata.block_size,
                logical_sector_size: f.metadata.logical_sector_size,
                physical_sector_size: f.metadata.physical_sector_size,
                file_size: meta.as_ref().map_or(0, |m| m.len()),
                creator: f.creator.clone(),
                virtual_disk_id: f.metadata.virtual_disk_id.to_string(),
                file_write_guid: h.file_write_guid.to_string(),
                data_write_guid: h.data_write_guid.to_string(),
                log: LogFacts {
                    offset: h.log_offset,
                    length: h.log_length,
                    guid: h.log_guid.to_string(),
                    state: log_state,
                    replayed_entries: entries,
                },
                block_states: f
                    .bat
                    .state_counts()
                    .into_iter()
                    .map(|(s, n)| (s.name(), n))
                    .collect(),
                sector_bitmap_blocks: sb_present,
                parent_locator: f
                    .metadata
                    .parent_locator
                    .as_ref()
                    .map(|l| l.entries.iter().cloned().collect()),
                chain: layers[i..]
                    .iter()
                    .map(|l| l.path().display().to_string())
                    .collect(),
            },
        },
    }
}

/// `1 GiB`, `196 KiB`, `1.5 MiB`, as qemu-img prints sizes.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        return format!("{n} B");
    }
    let digits = format!("{v:.3}");
    format!(
        "{} {}",
        digits.trim_end_matches('0').trim_end_matches('.'),
        UNITS[u]
    )
}

fn print_human(info: &ImageInfo) {
    let d = &info.format_specific.data;
    println!("image: {}", info.filename);
    println!("file format: {}", info.format);
    println!(
        "virtual size: {} ({} bytes)",
        human_size(info.virtual_size),
        info.virtual_size
    );
    println!("disk size: {}", human_size(info.actual_size));
    println!("cluster_size: {}", info.cluster_size);
    if let Some(b) = &info.backing_filename {
        println!("backing file: {b}");
        println!("backing file format: vhdx");
    }
    println!("Format specific information:");
    println!("    subformat: {}", d.subformat);
    println!("    block size: {}", human_size(u64::from(d.block_size)));
    println!("    logical sector size: {}", d.logical_sector_size);
    println!("    physical sector size: {}", d.physical_sector_size);
    println!(
        "    file size: {} ({} bytes)",
        human_size(d.file_size),
        d.file_size
    );
    println!("    creator: {}", d.creator);
    println!("    virtual disk id: {}", d.virtual_disk_id);
    println!("    data write guid: {}", d.data_write_guid);
    println!(
        "    log: {} at {:#x}, {}{}",
        human_size(u64::from(d.log.length)),
        d.log.offset,
        d.log.state,
        match d.log.state {
            "dirty" => format!(
                " ({} entries replayed in memory; open writable or run `check -r all` to apply)",
                d.log.replayed_entries
            ),
            "replayed" => format!(" ({} entries)", d.log.replayed_entries),
            _ => String::new(),
        }
    );
    let states: Vec<String> = d
        .block_states
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("    blocks: {}", states.join(" "));
    if d.subformat == "differencing" {
        println!("    sector bitmap blocks: {}", d.sector_bitmap_blocks);
    }
    if let Some(l) = &d.parent_locator {
        println!("    parent locator:");
        for (k, v) in l {
            println!("        {k}: {v}");
        }
        if l.contains_key(crate::vhdx::locator::KEY_PARENT_LINKAGE2) {
            println!(
                "    parent_linkage2: a commit into the parent started and did not finish (the chain reads as before; run `commit` again to finish it)"
            );
        }
    }
    if d.chain.len() > 1 {
        println!("Parent chain:");
        for (i, p) in d.chain.iter().enumerate() {
            println!("    {i}: {p}");
        }
    }
}

pub fn run(args: InfoArgs) -> CliResult<ExitCode> {
    check_format(&args.format, &["vhdx"])?;
    let chain = Chain::open(&args.file, &args.chain.options(false))?;
    let count = if args.backing_chain {
        chain.layers().len()
    } else {
        1
    };
    let infos: Vec<ImageInfo> = (0..count).map(|i| image_info(&chain, i)).collect();
    match args.output {
        OutputFormat::Json if args.backing_chain => {
            println!("{}", serde_json::to_string_pretty(&infos)?)
        }
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&infos[0])?),
        OutputFormat::Human => {
            for (i, info) in infos.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_human(info);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes_print_like_qemu_img() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(196 << 10), "196 KiB");
        assert_eq!(human_size(100), "100 B");
        assert_eq!(human_size(3 << 19), "1.5 MiB");
    }
}
