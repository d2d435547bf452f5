//! The `tern` binary. Everything it does starts in [`app::main`].

mod app;

/// jemalloc, not glibc's allocator: a listener's WebRTC handshake makes many short-lived
/// allocations around the few that last its session. With glibc the survivors pinned
/// pages that stayed resident after the handshake state was freed (30 KiB per listener
/// after a burst of 1,200 connections, against 18 KiB with jemalloc's size-class slabs; see
/// docs/benchmarks.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    app::main()
}
