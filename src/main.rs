use clap::Parser;
use std::process::ExitCode;

/// mimalloc: the proxy allocates small, short-lived buffers per request, and
/// measured 1-3 µs less per request than the system allocator for a few MB
/// of memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    keyrouter::cli::run(keyrouter::cli::Cli::parse())
}
