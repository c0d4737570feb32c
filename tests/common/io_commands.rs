//! Commands for our `io` and for qemu-io, which take the same command language.

/// One `io` / qemu-io command. A test binary adds its own methods (what the command does to its
/// model of the disk) in an `impl Op` of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `write -P PATTERN OFFSET LENGTH`
    Write(u8, u64, u64),
    /// `write -z OFFSET LENGTH`
    Zero(u64, u64),
    /// `discard OFFSET LENGTH`
    Discard(u64, u64),
    /// `flush`
    Flush,
}

impl Op {
    /// The command as `io -c` and `qemu-io -c` take it.
    pub fn command(&self) -> String {
        match *self {
            Op::Write(p, off, len) => format!("write -P {p:#04x} {off} {len}"),
            Op::Zero(off, len) => format!("write -z {off} {len}"),
            Op::Discard(off, len) => format!("discard {off} {len}"),
            Op::Flush => "flush".into(),
        }
    }
}
