//! Giving the memory of a torn-down engine back to the system.
//!
//! llama.cpp allocates a context's KV cache and compute buffers, and the repacked copies of
//! its weights, with `malloc`. glibc serves a block of that size from `mmap` (given back on
//! `free`) only until the first such block is freed: then it raises its mmap threshold to that
//! block's size (up to 32 MiB) and serves every later one from a malloc arena, whose free space
//! it returns only when it sits at the top of the arena. Each engine runs on its own thread,
//! and so allocates in whichever arena that thread got; after a few starts and stops the freed
//! buffers of dead engines stay resident there, scattered between live blocks.
//!
//! Measured with `max_running_instances: 1` cycling three copies of the test model (2048 tokens
//! of context, 4 slots): with a budget that holds one model (every swap a cold load), resident
//! memory grew ~10 MiB per swap (433 → 553 MiB over 15); with parking (contexts freed, weights
//! kept) by 30 MiB per swap (`paddock bench --swap-models 3`: 1028 → 1777 MiB over 30). All of it
//! was anonymous memory in 64 MiB-aligned arena heaps, and `malloc_trim(0)` called on the
//! process (from gdb) brought the first case back from 566 to 392 MiB: the memory was free, only
//! not returned. `MALLOC_ARENA_MAX=1` did not help (the one arena fragments the same way).
//! With the calls below: 441 → 394 MiB over 24 cold swaps, 972 → 973 MiB over 30 parked ones
//! (`tests/memory.rs` checks the latter).
//!
//! So when an engine's context or a set of weights is freed, [`release_freed_memory`] asks glibc
//! to return the free pages of every arena (`malloc_trim(0)` walks them all and `madvise`s whole
//! free pages away). That runs once per stop, park or weights release, never while decoding, so
//! the decode loop keeps glibc's adaptive threshold (a fixed low `M_MMAP_THRESHOLD` would also
//! stop the growth, but makes every large temporary buffer an `mmap` + page faults).

use std::time::Instant;

/// Returns the free memory of every malloc arena to the system (glibc); a no-op elsewhere.
/// Blocking, 1–12 ms measured here (about what freeing the model it follows costs): call it
/// right after a llama.cpp object is dropped, outside any lock.
pub fn release_freed_memory(after: &str) {
    let started = Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only takes glibc's arena locks and releases pages that hold no live
    // allocation; it may be called from any thread at any time.
    let released = unsafe { libc::malloc_trim(0) } == 1;
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let released = false;
    tracing::debug!(after, released, ms = started.elapsed().as_secs_f64() * 1e3, "returned free heap memory");
}

/// Calls [`release_freed_memory`] when dropped: the last field of a struct that owns llama.cpp
/// objects, so that it runs after they are freed (fields drop in declaration order).
pub struct ReleaseOnDrop(pub &'static str);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        release_freed_memory(self.0);
    }
}
