//! `io [-r] -c CMD [-c CMD]... FILE`: qemu-io's command syntax for users, scripts and tests.
//!
//! Commands: `write [-P PATTERN | -z] OFF LEN`, `read [-P PATTERN] OFF LEN`, `discard OFF LEN`,
//! `flush`. Every command is parsed before the image is opened, so a typo changes nothing. The
//! exit status is non-zero when a command fails or a read does not match its pattern (unlike
//! qemu-io, which reports such failures and still exits 0).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use super::info::human_size;
use super::options::parse_size;
use super::{check_format, CacheMode, ChainArgs, CliResult};
use crate::vhdx::{Chain, ChainOptions};

/// Data moves in pieces of this size, so a large LEN does not need a buffer that large.
const PIECE: u64 = 4 << 20;

#[derive(clap::Args, Debug)]
pub struct IoArgs {
    /// Image format; only vhdx.
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Open read-only (writes, discards and flushes fail).
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// A command to run; repeat for more, run in order.
    #[arg(short = 'c', value_name = "CMD", required = true)]
    pub commands: Vec<String>,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The host page cache, as qemu-io's `-t`: none (O_DIRECT), writeback, writethrough (a
    /// flush after every command that changes the image).
    #[arg(short = 't', long = "cache", value_enum, default_value_t = CacheMode::Writeback)]
    pub cache: CacheMode,
    #[command(flatten)]
    pub chain: ChainArgs,
    pub file: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoCommand {
    Write {
        offset: u64,
        len: u64,
        /// `None`: write zeros with write-zeroes (`-z`).
        pattern: Option<u8>,
    },
    Read {
        offset: u64,
        len: u64,
        pattern: Option<u8>,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    Flush,
}

fn parse_pattern(s: &str) -> Result<u8, String> {
    let v = if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16)
    } else {
        s.parse::<u64>()
    }
    .map_err(|_| format!("invalid pattern {s:?}"))?;
    u8::try_from(v).map_err(|_| format!("pattern {s:?} does not fit in a byte"))
}

/// Parses one command line such as `write -P 0xab 1M 64k`.
pub fn parse_command(line: &str) -> Result<IoCommand, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&name, rest)) = words.split_first() else {
        return Err("empty command".into());
    };
    let mut pattern = None;
    let mut zero = false;
    let mut args = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        match rest[i] {
            "-P" if name != "discard" && name != "flush" => {
                let p = rest
                    .get(i + 1)
                    .ok_or_else(|| format!("{name}: -P needs a pattern"))?;
                pattern = Some(parse_pattern(p)?);
                i += 2;
            }
            "-z" if name == "write" => {
                zero = true;
                i += 1;
            }
            flag if flag.starts_with('-') => {
                return Err(format!("{name}: unknown option {flag}"));
            }
            arg => {
                args.push(arg);
                i += 1;
            }
        }
    }
    let range = |args: &[&str]| -> Result<(u64, u64), String> {
        match args {
            [off, len] => Ok((parse_size(off)?, parse_size(len)?)),
            _ => Err(format!("{name}: expected OFFSET LENGTH in {line:?}")),
        }
    };
    match name {
        "write" => {
            if zero && pattern.is_some() {
                return Err("write: -P and -z exclude each other".into());
            }
            let (offset, len) = range(&args)?;
            Ok(IoCommand::Write {
                offset,
                len,
                pattern: if zero {
                    None
                } else {
                    Some(pattern.unwrap_or(0xcd))
                },
            })
        }
        "read" => {
            let (offset, len) = range(&args)?;
            Ok(IoCommand::Read {
                offset,
                len,
                pattern,
            })
        }
        "discard" => {
            let (offset, len) = range(&args)?;
            Ok(IoCommand::Discard { offset, len })
        }
        "flush" if args.is_empty() => Ok(IoCommand::Flush),
        "flush" => Err("flush takes no arguments".into()),
        other => Err(format!(
            "unknown command {other:?} (write, read, discard, flush)"
        )),
    }
}

/// Runs one command; `Ok(false)` when a read did not match its pattern.
fn execute(chain: &Chain, cmd: &IoCommand, quiet: bool) -> CliResult<bool> {
    let started = Instant::now();
    let mut matched = true;
    let (verb, offset, len) = match *cmd {
        IoCommand::Write {
            offset,
            len,
            pattern,
        } => {
            match pattern {
                None => chain.write_zeroes(offset, len)?,
                Some(p) => {
                    chain.check_range(offset, len)?;
                    let buf = vec![p; PIECE.min(len) as usize];
                    let mut at = 0;
                    while at < len {
                        let n = (len - at).min(PIECE);
                        chain.write_at(&buf[..n as usize], offset + at)?;
                        at += n;
                    }
                }
            }
            ("wrote", offset, len)
        }
        IoCommand::Read {
            offset,
            len,
            pattern,
        } => {
            chain.check_range(offset, len)?;
            let mut buf = vec![0u8; PIECE.min(len) as usize];
            let mut at = 0;
            while at < len {
                let n = (len - at).min(PIECE) as usize;
                chain.read_at(&mut buf[..n], offset + at)?;
                if let Some(p) = pattern {
                    if let Some(i) = buf[..n].iter().position(|&b| b != p) {
                        eprintln!(
                            "Pattern verification failed at offset {}: {:#04x} instead of {p:#04x}",
                            offset + at + i as u64,
                            buf[i]
                        );
                        matched = false;
                        break;
                    }
                }
                at += n as u64;
            }
            ("read", offset, len)
        }
        IoCommand::Discard { offset, len } => {
            chain.discard(offset, len)?;
            ("discard", offset, len)
        }
        IoCommand::Flush => {
            chain.flush()?;
            return Ok(true);
        }
    };
    if !quiet {
        let secs = started.elapsed().as_secs_f64();
        println!("{verb} {len}/{len} bytes at offset {offset}");
        println!(
            "{}, 1 ops; {secs:.4} sec ({}/sec)",
            human_size(len),
            human_size((len as f64 / secs.max(1e-9)) as u64)
        );
    }
    Ok(matched)
}

pub fn run(args: IoArgs) -> CliResult<ExitCode> {
    check_format(&args.format, &["vhdx"])?;
    let commands = args
        .commands
        .iter()
        .map(|c| parse_command(c))
        .collect::<Result<Vec<_>, _>>()?;
    let options = ChainOptions {
        direct: args.cache.direct(),
        ..args.chain.options(!args.read_only)
    };
    let chain = Chain::open(&args.file, &options)?;
    let mut all_matched = true;
    for cmd in &commands {
        let through =
            args.cache == CacheMode::Writethrough && !matches!(cmd, IoCommand::Read { .. });
        match execute(&chain, cmd, args.quiet).and_then(|m| {
            if through {
                chain.flush()?;
            }
            Ok(m)
        }) {
            Ok(m) => all_matched &= m,
            Err(e) => {
                // The commands before this one are kept: close cleanly, then report.
                let _ = chain.close();
                return Err(e);
            }
        }
    }
    chain.close()?;
    Ok(if all_matched {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_like_qemu_io() {
        assert_eq!(
            parse_command("write -P 0xab 1M 64k"),
            Ok(IoCommand::Write {
                offset: 1 << 20,
                len: 64 << 10,
                pattern: Some(0xab)
            })
        );
        assert_eq!(
            parse_command("write -z 0 4096"),
            Ok(IoCommand::Write {
                offset: 0,
                len: 4096,
                pattern: None
            })
        );
        assert_eq!(
            parse_command("read -P 17 512 512"),
            Ok(IoCommand::Read {
                offset: 512,
                len: 512,
                pattern: Some(17)
            })
        );
        assert_eq!(parse_command("flush"), Ok(IoCommand::Flush));
        assert_eq!(
            parse_command("discard 0 1G"),
            Ok(IoCommand::Discard {
                offset: 0,
                len: 1 << 30
            })
        );
        for bad in [
            "",
            "wirte 0 1",
            "write 0",
            "write -P 0x100 0 1",
            "write -P 1 -z 0 1",
            "read -z 0 1",
            "flush 1",
            "discard -P 1 0 1",
            "read 0 1X",
        ] {
            assert!(parse_command(bad).is_err(), "{bad:?} parsed");
        }
    }
}
