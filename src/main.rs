//! `vhost-user-vhdx`: parse the command line, run the subcommand, turn any error into one line
//! and a non-zero exit status.

use std::process::ExitCode;

use clap::Parser;
use vhost_user_vhdx::cli::{self, Cli};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return cli::usage_error(e),
    };
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vhost-user-vhdx: {}", cli::one_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
