use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    keyrouter::cli::run(keyrouter::cli::Cli::parse())
}
