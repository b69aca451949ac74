use clap::Parser;
use std::process::ExitCode;

mod allocator;

/// mimalloc instead of the C library's allocator: per-thread heaps, and a
/// buffer freed on another thread than the one that allocated it goes back
/// without taking a lock. A proxied request makes a few dozen allocations
/// (most in hyper); glibc's allocator spent about a tenth of the proxy's CPU
/// time on them, merging free lists included. Built with `no_thp`, so that
/// it does not ask for transparent huge pages: with them, partly used heap
/// memory is resident in whole 2 MiB pages, and keyrouter with 1,000 keys
/// measured over 70 MB resident instead of about 28 MB. On hosts whose THP
/// mode is `always` the kernel hands them out unasked;
/// `MIMALLOC_ALLOW_THP=0` turns them off for the process (the Kubernetes
/// manifest sets it).
#[global_allocator]
static ALLOCATOR: allocator::Mimalloc = allocator::Mimalloc;

fn main() -> ExitCode {
    keyrouter::cli::run(keyrouter::cli::Cli::parse())
}
