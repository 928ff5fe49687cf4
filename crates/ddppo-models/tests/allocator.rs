//! `tune_allocator`: glibc accepts its settings, memory a thread frees is
//! reused without page faults, and threads keep their own arenas (its own
//! process: the settings are process-wide).

/// Minor page faults of the calling thread so far.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn minor_faults() -> i64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
    u.ru_minflt
}

/// Page faults of one training-step-like round: eight 8 MiB buffers alive at
/// once, every byte written, then all freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn round() -> i64 {
    let before = minor_faults();
    let bufs: Vec<Vec<u8>> = (0..8)
        .map(|i| {
            let mut v = Vec::with_capacity(8 << 20);
            v.resize(8 << 20, i as u8);
            v
        })
        .collect();
    let sum: u64 = bufs.iter().map(|b| u64::from(b[b.len() - 1])).sum();
    assert_eq!(sum, 28);
    drop(bufs);
    minor_faults() - before
}

/// The first round faults in its 64 MiB (16,384 pages). With glibc's defaults,
/// or with the two thresholds but not the top pad, every later round faults
/// again (2,049 a round measured: the thread's arena unmaps a heap that comes
/// free); tuned, the later rounds reuse the memory. The thread is a spawned
/// one with its own arena, as the gradient ensemble's training thread is in a
/// run.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn freed_tensors_are_reused_without_page_faults() {
    assert!(ddppo_models::tune_allocator(), "glibc refused a setting");
    let faults = std::thread::spawn(|| (0..6).map(|_| round()).collect::<Vec<i64>>()).join().unwrap();
    let pages = (64 << 20) / 4096;
    assert!(faults[0] > pages / 2, "the first round writes fresh memory: {faults:?}");
    for f in &faults[2..] {
        assert!(*f * 20 < faults[0], "later rounds reuse it: {faults:?}");
    }
}

/// Where a fresh thread's first allocations come from: glibc's main heap lies
/// below the program break, a thread arena's heaps are mappings above it
/// (x86-64 and aarch64 Linux place mappings above the break). With one arena
/// for all threads (`M_ARENA_MAX` 1, the earlier tuning), a policy update's
/// calling thread and split helper wait on each other's allocations
/// (`tune_allocator`'s doc has the figures); with the tuning now, each thread
/// allocates from its own arena.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn threads_allocate_from_their_own_arenas() {
    assert!(ddppo_models::tune_allocator(), "glibc refused a setting");
    let spawned = std::thread::spawn(|| {
        let bufs: Vec<Vec<u8>> = (0..4).map(|i| vec![i as u8; 4096]).collect();
        let addrs: Vec<usize> = bufs.iter().map(|b| b.as_ptr() as usize).collect();
        assert_eq!(bufs.iter().map(|b| usize::from(b[4095])).sum::<usize>(), 6);
        addrs
    })
    .join()
    .unwrap();
    // SAFETY: sbrk(0) only reads the current break.
    let brk = unsafe { libc::sbrk(0) } as usize;
    for a in &spawned {
        assert!(*a > brk, "a thread's buffer at {a:#x} lies in the main heap (break {brk:#x}): {spawned:x?}");
    }
}
