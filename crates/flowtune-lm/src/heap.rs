//! The process heap policy for CPU runs, chosen by binaries (not applied by the library).
//!
//! libtorch takes every tensor from `malloc`. glibc serves blocks above a moving threshold
//! (at most 32 MiB) from fresh `mmap`s and unmaps them on `free`, and trims the heap top once
//! it passes 128 KiB. A prefill's activations (a 16-row relevance batch's MLP output is
//! ~40 MiB in float32) are allocated and freed every layer, so the kernel zeroes and maps the
//! same pages again on every call: `clear_page_erms` took 5.7 % of a MuSiQue eval run
//! (`docs/benchmarks.md`, session 10). [`retain_freed_memory`] keeps freed blocks in the heap.

/// Keeps memory that libtorch frees inside the process for reuse: no `mmap` per large block
/// and no heap trimming below 2 GiB of free top. Peak resident memory stays what the run
/// needs; what is freed is not handed back to the system until the process exits.
///
/// Call it once at the start of `main`, before any thread starts. Returns whether the policy
/// was applied: only with glibc on Linux; elsewhere it does nothing and returns `false`.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only sets allocator parameters; both are valid glibc options
        // with in-range values, and the caller runs this before other threads exist.
        let mapped = unsafe { libc::mallopt(libc::M_MMAP_MAX, 0) };
        // SAFETY: as above.
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) };
        mapped == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Minor page faults of the calling thread so far.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn thread_minor_faults() -> i64 {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: `usage` is a valid out-pointer for one `rusage`.
        let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: `getrusage` succeeded, so it filled the struct (zeroed before anyway).
        unsafe { usage.assume_init() }.ru_minflt
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn freed_blocks_are_reused_without_page_faults() {
        assert!(retain_freed_memory());
        // 40 MiB is above glibc's largest default mmap threshold (32 MiB): by default it is
        // mapped, zeroed by the kernel page by page (~10k faults) and unmapped on every round.
        let bytes = 40 << 20;
        let touch = || {
            let v = vec![1u8; bytes];
            std::hint::black_box(&v);
        };
        touch();
        let before = thread_minor_faults();
        touch();
        let faults = thread_minor_faults() - before;
        // Tolerance: a few pages of allocator bookkeeping, far below the block's 10240 pages.
        assert!(
            faults < 100,
            "{faults} page faults re-touching a freed block"
        );
    }
}
