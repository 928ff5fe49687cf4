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

/// Which arena a fresh thread's allocations come from, read off glibc's chunk
/// header: the size word just before the pointer `malloc` returns has bit 2
/// (`NON_MAIN_ARENA` in glibc's malloc.c) set for a chunk of a thread arena.
/// With one arena for all threads (`M_ARENA_MAX` 1, the earlier tuning), a
/// policy update's calling thread and split helper wait on each other's
/// allocations (`tune_allocator`'s doc has the figures); with the tuning now,
/// each thread allocates from its own arena.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn threads_allocate_from_their_own_arenas() {
    const NON_MAIN_ARENA: usize = 0x4;
    assert!(ddppo_models::tune_allocator(), "glibc refused a setting");
    let headers = std::thread::spawn(|| {
        (0..4)
            .map(|_| {
                // SAFETY: a plain malloc of 4 KiB; glibc puts the chunk's size word
                // in the 8 bytes before the pointer it returns, inside its chunk
                // (mapped, aligned), which we read once before freeing the chunk.
                // The address goes through `black_box` and the read is volatile:
                // the compiler would otherwise treat the word as outside the
                // allocation and fold the read away (it did: zeros).
                unsafe {
                    let p = libc::malloc(4096);
                    assert!(!p.is_null(), "malloc failed");
                    let word = std::hint::black_box(p as usize) - std::mem::size_of::<usize>();
                    let size_word = std::ptr::read_volatile(word as *const usize);
                    libc::free(p);
                    size_word
                }
            })
            .collect::<Vec<usize>>()
    })
    .join()
    .unwrap();
    for h in &headers {
        assert!(h & !0x7 >= 4096, "not a chunk header: {headers:x?}");
        assert!(h & NON_MAIN_ARENA != 0, "a thread's chunk comes from the main arena: {headers:x?}");
    }
}
