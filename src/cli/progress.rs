//! The progress bar of the long-running commands (`convert`, `commit`, `resize`, `compact`):
//! `-p` shows it, `-q` never does, and by default it shows when stderr is a terminal.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

#[derive(clap::Args, Clone, Copy, Debug)]
pub struct ProgressArgs {
    /// Show a progress bar (the default when stderr is a terminal).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Never show a progress bar.
    #[arg(short = 'q')]
    pub quiet: bool,
}

/// What the bar counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Bytes copied: shows the amount and the rate.
    Bytes,
    /// Steps of some work: shows the percentage only.
    Steps,
}

impl ProgressArgs {
    pub fn show(&self) -> bool {
        !self.quiet && (self.progress || std::io::stderr().is_terminal())
    }

    /// A bar on stderr, or a hidden one when [`ProgressArgs::show`] says no.
    pub fn bar(&self, unit: Unit) -> Progress {
        if !self.show() {
            return Progress(ProgressBar::hidden());
        }
        let template = match unit {
            Unit::Bytes => "{bar:40} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            Unit::Steps => "{bar:40} {percent:>3}% eta {eta}",
        };
        let b = ProgressBar::new(1);
        b.set_style(ProgressStyle::with_template(template).expect("valid template"));
        Progress(b)
    }
}

pub struct Progress(ProgressBar);

impl Progress {
    /// `done` of `total` (which may change as the work finds out more).
    pub fn update(&self, done: u64, total: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }

    /// Clears the bar from the terminal.
    pub fn finish(self) {
        self.0.finish_and_clear();
    }
}
