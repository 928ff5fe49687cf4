//! One matrix product split over persistent helper threads, with the numbers
//! of the unsplit product.
//!
//! The per-step updates of a run (SAC critic and the policy update through the
//! model) are chains of small products on 256-row batches, too small for
//! threads started per call (tens of microseconds each) and for rayon's pool
//! (whose gemm split measured slower than one thread on the 2-core machine).
//! [`gemm_split`] hands part of one product to a helper thread that stays alive
//! between calls: after a job it spins for [`HELPER_SPIN`] waiting for the next
//! (a per-step update issues one every few tens of microseconds), then sleeps
//! on a condition variable, so an idle run costs no CPU.
//!
//! Same numbers: gemm computes each element of the product as one chain of
//! multiply-adds over `k` in blocks of `kc`, with `kc` a function of `k` alone
//! when `k <= 512` (one block). A part of the rows (or columns) of the
//! destination therefore gets, element for element, the value the whole product
//! gives it, provided the part takes the same kernel path: gemm treats products
//! with a single row or column (matrix-vector), with at most 256 elements (a
//! horizontal kernel) and with `k <= 2` specially, so a product is only split
//! into parts of at least 2 rows and columns and more than 256 elements, and
//! never when `k > 512`. `tests/split.rs` compares split and whole products bit
//! for bit over shapes and strides.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a helper spins for its next job before it sleeps.
pub const HELPER_SPIN: Duration = Duration::from_micros(1000);

/// Products below this many multiply-adds stay on the calling thread.
pub const MIN_SPLIT_WORK: usize = 1 << 16;

/// The largest `k` a product is split at (gemm's depth block is then `k`).
pub const MAX_SPLIT_DEPTH: usize = 512;

const IDLE: u8 = 0;
const POSTED: u8 = 1;
const RUNNING: u8 = 2;
const DONE: u8 = 3;

/// A job: the caller's closure, called with a part index. Only dereferenced
/// while the caller waits for it (see [`run_parts`]).
#[derive(Clone, Copy)]
struct JobPtr(*const (dyn Fn(usize) + Sync), usize);
// SAFETY: the pointee is `Sync` and outlives every use (the caller blocks until
// the helper reports DONE).
unsafe impl Send for JobPtr {}

impl JobPtr {
    /// Part `part` of `f`, its lifetime erased.
    ///
    /// # Safety
    /// `f` must outlive every use of the job: whoever posts it waits for it
    /// (or takes it back) before `f` goes.
    unsafe fn new(f: &(dyn Fn(usize) + Sync), part: usize) -> Self {
        // SAFETY: the caller's contract.
        let erased: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f as *const _) };
        Self(erased, part)
    }
}

struct Helper {
    state: AtomicU8,
    sleeping: AtomicBool,
    panicked: AtomicBool,
    /// When ([`now_ns`]) the helper started its last job.
    started_ns: AtomicU64,
    job: UnsafeCell<Option<JobPtr>>,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written by the one caller holding the helper (taken from the
// pool's free list) before it publishes POSTED, and read by the helper thread
// after it observes POSTED; the state's SeqCst accesses order the two.
unsafe impl Sync for Helper {}

impl Helper {
    fn new() -> Self {
        Self {
            state: AtomicU8::new(IDLE),
            sleeping: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            started_ns: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    fn post(&self, job: JobPtr) {
        // SAFETY: see `unsafe impl Sync`: the helper does not read `job` until POSTED.
        unsafe { *self.job.get() = Some(job) };
        self.state.store(POSTED, Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst) {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.wake.notify_one();
        }
    }

    /// Takes the posted job back when the helper has not started it (on a busy
    /// machine the helper may be waiting for a core); true when taken back, and
    /// the caller then runs it itself.
    fn reclaim(&self) -> bool {
        self.state.compare_exchange(POSTED, IDLE, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    /// Waits for the posted job, which the helper has started; true when it panicked.
    fn wait_done(&self) -> bool {
        let mut spins = 0u32;
        while self.state.load(Ordering::SeqCst) != DONE {
            spins += 1;
            if spins < 1 << 14 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        self.state.store(IDLE, Ordering::SeqCst);
        self.panicked.swap(false, Ordering::SeqCst)
    }

    fn serve(&self) {
        loop {
            let start = Instant::now();
            let mut n = 0u32;
            while self.state.load(Ordering::SeqCst) != POSTED {
                std::hint::spin_loop();
                n += 1;
                if n.is_multiple_of(256) && start.elapsed() > HELPER_SPIN {
                    let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
                    self.sleeping.store(true, Ordering::SeqCst);
                    while self.state.load(Ordering::SeqCst) != POSTED {
                        g = self.wake.wait(g).unwrap_or_else(|p| p.into_inner());
                    }
                    self.sleeping.store(false, Ordering::SeqCst);
                    break;
                }
            }
            // The caller may have taken the job back meanwhile ([`Helper::reclaim`]).
            if self.state.compare_exchange(POSTED, RUNNING, Ordering::SeqCst, Ordering::SeqCst).is_err() {
                continue;
            }
            self.started_ns.store(now_ns(), Ordering::Relaxed);
            // SAFETY: POSTED -> RUNNING won: the caller wrote the job and now waits for DONE.
            let job = unsafe { (*self.job.get()).take() };
            if let Some(JobPtr(f, part)) = job {
                // SAFETY: the closure outlives the job (the caller blocks in `wait_done`).
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*f)(part) }));
                if r.is_err() {
                    self.panicked.store(true, Ordering::SeqCst);
                }
            }
            self.state.store(DONE, Ordering::SeqCst);
        }
    }
}

struct Pool {
    free: Mutex<Vec<Arc<Helper>>>,
    started: Mutex<usize>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool { free: Mutex::new(Vec::new()), started: Mutex::new(0) })
}

/// Takes up to `n` idle helpers, starting new ones while fewer than `limit` exist.
fn take_helpers(n: usize, limit: usize) -> Vec<Arc<Helper>> {
    let p = pool();
    let mut got = {
        let mut free = p.free.lock().unwrap_or_else(|e| e.into_inner());
        let keep = free.len().saturating_sub(n);
        free.split_off(keep)
    };
    let mut started = p.started.lock().unwrap_or_else(|e| e.into_inner());
    while got.len() < n && *started < limit {
        let h = Arc::new(Helper::new());
        let worker = Arc::clone(&h);
        let spawned = std::thread::Builder::new().name("ddppo-split".into()).spawn(move || worker.serve()).is_ok();
        if !spawned {
            break;
        }
        *started += 1;
        got.push(h);
    }
    got
}

fn give_back(helpers: Vec<Arc<Helper>>) {
    pool().free.lock().unwrap_or_else(|e| e.into_inner()).extend(helpers);
}

/// A helper that starts its part sooner than this after it was posted is never
/// late: a spinning helper on a free core starts within a microsecond, a
/// descheduled one after milliseconds (the kernel's time slice); tiny parts
/// (an optimiser step's few values) would otherwise count picking up a part at
/// all as late.
pub const LATE_START: Duration = Duration::from_micros(20);

/// What a late helper adds to [`Contention`]'s score (a helper in time takes 1 off).
pub const LATE_COST: u32 = 8;

/// The score at which the parts run on the calling thread for a [`SERIAL_SPELL`].
pub const LATE_LIMIT: u32 = 64;

/// How long the parts run on the calling thread once the helpers came late too
/// often; twice as long as the last spell when that ended less than its own
/// length ago, up to [`MAX_SERIAL_SPELL`].
pub const SERIAL_SPELL: Duration = Duration::from_millis(20);

/// The longest serial spell (the helpers are tried again after it).
pub const MAX_SERIAL_SPELL: Duration = Duration::from_millis(1280);

/// Whether the helpers get a core in time. On a busy machine (more runnable
/// threads than cores) a helper is often descheduled when its part is posted:
/// the caller then runs the part itself ([`Helper::reclaim`]), and the
/// helper's spinning only took CPU from the other work. Measured on the 2-core
/// machine with two busy loops beside `ddppo profile --env ant --rows 5000`:
/// Ant's policy updates took 1.02-1.34 s per env step when the caller waited
/// for its helpers, 0.21-0.27 s with parts taken back, 0.19-0.20 s with the
/// serial spells below, 0.15-0.20 s on one thread. Each late helper adds
/// [`LATE_COST`], each one in time takes 1 off; at [`LATE_LIMIT`] the parts
/// run on the calling thread for a [`SERIAL_SPELL`] (the helpers fall asleep),
/// then the helpers are tried again. An idle machine's helper is late only
/// when woken from sleep. Which thread runs a part does not change its numbers.
pub struct Contention {
    score: AtomicU32,
    serial_until_ns: AtomicU64,
    spell_ns: AtomicU64,
    spells: AtomicU64,
}

impl Contention {
    const fn new() -> Self {
        Self {
            score: AtomicU32::new(0),
            serial_until_ns: AtomicU64::new(0),
            spell_ns: AtomicU64::new(0),
            spells: AtomicU64::new(0),
        }
    }

    /// Whether parts may go to helpers at `now_ns` (nanoseconds on any clock).
    fn parallel_at(&self, now_ns: u64) -> bool {
        now_ns >= self.serial_until_ns.load(Ordering::Relaxed)
    }

    /// Records one parallel call's helpers: `late` of them started their part
    /// only after half the time the caller took for its own (or not before the
    /// caller took it back), `in_time` sooner.
    fn record(&self, late: u32, in_time: u32, now_ns: u64) {
        let next = |s: u32| (s + late * LATE_COST).saturating_sub(in_time);
        let prev = self
            .score
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some(next(s).min(LATE_LIMIT)))
            .unwrap_or_else(|s| s);
        if next(prev) >= LATE_LIMIT {
            self.score.store(0, Ordering::Relaxed);
            let (last_end, last) =
                (self.serial_until_ns.load(Ordering::Relaxed), self.spell_ns.load(Ordering::Relaxed));
            let spell = if last > 0 && now_ns.saturating_sub(last_end) < last {
                (2 * last).min(MAX_SERIAL_SPELL.as_nanos() as u64)
            } else {
                SERIAL_SPELL.as_nanos() as u64
            };
            self.spell_ns.store(spell, Ordering::Relaxed);
            self.serial_until_ns.store(now_ns + spell, Ordering::Relaxed);
            self.spells.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many serial spells began.
    pub fn spells(&self) -> u64 {
        self.spells.load(Ordering::Relaxed)
    }

    /// The length of the last serial spell (zero before the first).
    pub fn last_spell(&self) -> Duration {
        Duration::from_nanos(self.spell_ns.load(Ordering::Relaxed))
    }
}

static CONTENTION: Contention = Contention::new();

/// The process's [`Contention`] gauge of the split helpers.
pub fn contention() -> &'static Contention {
    &CONTENTION
}

fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Calls `f(0) .. f(parts - 1)`, part 0 on the calling thread and the others on
/// helper threads while there are idle ones (at most `threads - 1` helpers exist;
/// the parts left over run on the calling thread), unless the helpers came late
/// too often lately ([`Contention`]). A part no helper has started when the
/// calling thread is done with its own runs there too. Returns when all have
/// run; a panic in any part is resumed here.
pub fn run_parts(parts: usize, threads: usize, f: &(dyn Fn(usize) + Sync)) {
    if parts <= 1 || threads <= 1 || !CONTENTION.parallel_at(now_ns()) {
        (0..parts).for_each(f);
        return;
    }
    let helpers = take_helpers(parts - 1, threads - 1);
    let posted = now_ns();
    for (i, h) in helpers.iter().enumerate() {
        // SAFETY: every helper given a job is waited for below (or its job taken
        // back) before this function returns, so `f` outlives all uses.
        h.post(unsafe { JobPtr::new(f, i + 1) });
    }
    let late_start = LATE_START.as_nanos() as u64;
    let (mut panicked, mut late, mut in_time) = (false, 0u32, 0u32);
    let mut own_ns = 0;
    let own = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        f(0);
        (helpers.len() + 1..parts).for_each(f);
        own_ns = now_ns().saturating_sub(posted);
        // Parts no helper has started yet run here rather than wait for a core
        // (late, unless the own part was too short to tell).
        for (i, h) in helpers.iter().enumerate().rev() {
            if h.reclaim() {
                late += u32::from(own_ns > late_start);
                f(i + 1);
            }
        }
    }));
    for h in &helpers {
        if h.state.load(Ordering::SeqCst) != IDLE {
            panicked |= h.wait_done();
            // Late: started after half the caller's own part (most of the overlap
            // lost) and later than a spinning helper on a free core ever starts.
            let delay = h.started_ns.load(Ordering::Relaxed).saturating_sub(posted);
            if delay > own_ns / 2 && delay > late_start {
                late += 1;
            } else {
                in_time += 1;
            }
        }
    }
    if !helpers.is_empty() {
        CONTENTION.record(late, in_time, now_ns());
    }
    give_back(helpers);
    if let Err(p) = own {
        std::panic::resume_unwind(p);
    }
    if panicked {
        panic!("a split product's helper thread panicked");
    }
}

/// A raw pointer that may cross to a helper (the parts write disjoint elements).
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: used only for disjoint writes by the parts of one product.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
#[derive(Clone, Copy)]
struct SendConst<T>(*const T);
// SAFETY: read-only operands shared by the parts.
unsafe impl<T> Send for SendConst<T> {}
unsafe impl<T> Sync for SendConst<T> {}

/// Where a product of `m x n` elements and depth `k` is split: `Some((rows?, parts))`
/// (split the rows when true, else the columns), or `None` to compute it whole.
pub fn split_plan(m: usize, n: usize, k: usize, threads: usize) -> Option<(bool, usize)> {
    if threads <= 1 || k <= 2 || k > MAX_SPLIT_DEPTH || m.saturating_mul(n).saturating_mul(k) < MIN_SPLIT_WORK {
        return None;
    }
    let by_rows = m >= n;
    let (long, short) = if by_rows { (m, n) } else { (n, m) };
    if short < 2 {
        return None;
    }
    // Parts of at least 2 lines, more than 256 elements and MIN_SPLIT_WORK each.
    let min_lines = 2usize.max(257usize.div_ceil(short));
    let by_work = (m * n * k) / MIN_SPLIT_WORK;
    let parts = threads.min(long / min_lines).min(by_work.max(1));
    (parts >= 2).then_some((by_rows, parts))
}

/// The rows (or columns) `[start, end)` of part `i` of `parts` over `len` lines:
/// even cuts, so no part is shorter than `len / parts` lines ([`split_plan`]'s bound).
fn part_range(i: usize, parts: usize, len: usize) -> (usize, usize) {
    (len * i / parts, len * (i + 1) / parts)
}

/// `dst (m x n) = lhs (m x k) . rhs (k x n)` with gemm (candle's CPU matmul
/// kernel), `read_dst = false`, `alpha = 0`, `beta = 1`, as candle calls it,
/// split over up to `threads` threads by [`split_plan`]; every element equals
/// the unsplit call's. Strides in elements; the parts write disjoint elements.
///
/// # Safety
/// The pointers with their strides must address `m x k`, `k x n` and `m x n`
/// valid elements; `dst` must not overlap the operands.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_split<T: candle_core::WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    (dst_cs, dst_rs): (isize, isize),
    lhs: *const T,
    (lhs_cs, lhs_rs): (isize, isize),
    rhs: *const T,
    (rhs_cs, rhs_rs): (isize, isize),
    threads: usize,
) {
    let call = |m: usize, n: usize, dst: *mut T, lhs: *const T, rhs: *const T, par: gemm::Parallelism| {
        // SAFETY: the caller's contract, restricted to a block of rows or columns.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                dst_cs,
                dst_rs,
                false,
                lhs,
                lhs_cs,
                lhs_rs,
                rhs,
                rhs_cs,
                rhs_rs,
                T::from_f64(0.0),
                T::from_f64(1.0),
                false,
                false,
                false,
                par,
            )
        }
    };
    let Some((by_rows, parts)) = split_plan(m, n, k, threads) else {
        // As candle's matmul: its rayon pool when it has more than one thread.
        let par = match candle_core::utils::get_num_threads() {
            t if t > 1 => gemm::Parallelism::Rayon(t),
            _ => gemm::Parallelism::None,
        };
        call(m, n, dst, lhs, rhs, par);
        return;
    };
    let (d, l, r) = (SendPtr(dst), SendConst(lhs), SendConst(rhs));
    let len = if by_rows { m } else { n };
    let part = move |i: usize| {
        let (a, b) = part_range(i, parts, len);
        let (d, l, r) = (d, l, r);
        // SAFETY: block `[a, b)` of the rows (columns) of `dst` and `lhs` (`rhs`).
        unsafe {
            if by_rows {
                call(
                    b - a,
                    n,
                    d.0.offset(a as isize * dst_rs),
                    l.0.offset(a as isize * lhs_rs),
                    r.0,
                    gemm::Parallelism::None,
                )
            } else {
                call(
                    m,
                    b - a,
                    d.0.offset(a as isize * dst_cs),
                    l.0,
                    r.0.offset(a as isize * rhs_cs),
                    gemm::Parallelism::None,
                )
            }
        }
    };
    run_parts(parts, threads, &part);
}

/// `(m x k) (k x n)` into a fresh row-major `m x n` buffer by [`gemm_split`]:
/// each operand its elements from its first one on and its (column, row)
/// strides. An error, not a read out of bounds, when an operand is shorter
/// than its strided extent.
pub fn product<T: candle_core::WithDType>(
    (m, n, k): (usize, usize, usize),
    (lhs, (lhs_cs, lhs_rs)): (&[T], (usize, usize)),
    (rhs, (rhs_cs, rhs_rs)): (&[T], (usize, usize)),
    threads: usize,
) -> candle_core::Result<Vec<T>> {
    if m * n == 0 {
        return Ok(Vec::new());
    }
    let reach = |cs: usize, rs: usize, rows: usize, cols: usize| (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs + 1;
    if k > 0 && (lhs.len() < reach(lhs_cs, lhs_rs, m, k) || rhs.len() < reach(rhs_cs, rhs_rs, k, n)) {
        candle_core::bail!("product: operand smaller than ({m} x {k}) ({k} x {n})")
    }
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    // SAFETY: the extents checked above (with `k = 0` gemm reads nothing); gemm
    // with `read_dst = false` writes each of the `m * n` elements once before
    // `set_len`.
    unsafe {
        gemm_split(
            (m, n, k),
            out.as_mut_ptr(),
            (1, n as isize),
            lhs.as_ptr(),
            (lhs_cs as isize, lhs_rs as isize),
            rhs.as_ptr(),
            (rhs_cs as isize, rhs_rs as isize),
            threads,
        );
        out.set_len(m * n);
    }
    Ok(out)
}

/// `(a(), b())`, `a` on the calling thread and `b` on a helper thread at the
/// same time when one is idle (at most `threads - 1` exist), else `b` after
/// `a` on the calling thread. For two independent computations (the two
/// ensembles' forward passes of a policy-update step, the two Q networks):
/// products inside them then run unsplit on their own thread, which computes
/// the same numbers (module documentation). A panic in either is resumed here.
pub fn join<A: Send, B: Send>(threads: usize, a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B + Send) -> (A, B) {
    let (a, b) = (Mutex::new(Some(a)), Mutex::new(Some(b)));
    let (ra, rb) = (Mutex::new(None), Mutex::new(None));
    run_parts(2, threads, &|i| {
        if i == 0 {
            let f = a.lock().unwrap_or_else(|p| p.into_inner()).take();
            *ra.lock().unwrap_or_else(|p| p.into_inner()) = f.map(|f| f());
        } else {
            let f = b.lock().unwrap_or_else(|p| p.into_inner()).take();
            *rb.lock().unwrap_or_else(|p| p.into_inner()) = f.map(|f| f());
        }
    });
    let ra = ra.into_inner().unwrap_or_else(|p| p.into_inner());
    let rb = rb.into_inner().unwrap_or_else(|p| p.into_inner());
    match (ra, rb) {
        (Some(x), Some(y)) => (x, y),
        // run_parts runs both parts or resumes a panic.
        _ => unreachable!("join: a part did not run"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn post_counter(h: &Helper, f: &(dyn Fn(usize) + Sync), part: usize) {
        // SAFETY (test): `f` lives until the end of the test, past every use.
        h.post(unsafe { JobPtr::new(f, part) });
    }

    #[test]
    fn a_job_no_helper_has_started_is_taken_back_and_never_run_by_it() {
        let ran = [AtomicUsize::new(0), AtomicUsize::new(0)];
        let f = |i: usize| {
            ran[i].fetch_add(1, Ordering::SeqCst);
        };
        let h = Arc::new(Helper::new());
        post_counter(&h, &f, 0);
        assert!(h.reclaim(), "a posted job nobody started is taken back");
        assert!(!h.reclaim(), "only once");
        // A helper that starts serving now finds nothing to run ...
        let worker = Arc::clone(&h);
        std::thread::spawn(move || worker.serve());
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(ran[0].load(Ordering::SeqCst), 0);
        // ... and runs the next job once; a started job cannot be taken back.
        post_counter(&h, &f, 1);
        while h.state.load(Ordering::SeqCst) == POSTED {
            std::hint::spin_loop();
        }
        assert!(!h.reclaim());
        assert!(!h.wait_done());
        assert_eq!([ran[0].load(Ordering::SeqCst), ran[1].load(Ordering::SeqCst)], [0, 1]);
    }

    #[test]
    fn late_helpers_bring_a_serial_spell_and_helpers_in_time_none() {
        let spell = SERIAL_SPELL.as_nanos() as u64;
        let c = Contention::new();
        // In time: never serial.
        for i in 0..10_000 {
            c.record(0, 1, i);
        }
        assert!(c.parallel_at(10_000));
        assert_eq!(c.spells(), 0);
        // One late helper in ten calls (a wake from sleep): its cost is paid off
        // (the score only grows while more than 1 in LATE_COST + 1 come late).
        for i in 0..10_000u64 {
            c.record(u32::from(i % 10 == 0), u32::from(i % 10 != 0), i);
        }
        assert_eq!(c.spells(), 0);
        // Every helper late (a busy machine): a spell begins at the limit's call ...
        let c = Contention::new();
        let mut t = 0;
        while c.parallel_at(t) {
            c.record(1, 0, t);
            t += 1;
        }
        assert_eq!(t, u64::from(LATE_LIMIT / LATE_COST));
        assert_eq!(c.spells(), 1);
        // ... lasts SERIAL_SPELL, and the helpers are tried again after it with a clean score.
        assert!(!c.parallel_at(t - 1 + spell - 1));
        assert!(c.parallel_at(t - 1 + spell));
        c.record(1, 0, t + spell);
        assert!(c.parallel_at(t + spell + 1));
        // Late again right after it: twice as long, and so on up to the cap.
        let mut now = t + spell;
        let mut expect = spell;
        for _ in 0..10 {
            while c.parallel_at(now) {
                c.record(1, 0, now);
                now += 1;
            }
            expect = (2 * expect).min(MAX_SERIAL_SPELL.as_nanos() as u64);
            assert_eq!(c.last_spell().as_nanos() as u64, expect);
            now += expect;
        }
        assert_eq!(c.last_spell(), MAX_SERIAL_SPELL);
        // Late only long after the last spell: back to the first length.
        now += 10 * MAX_SERIAL_SPELL.as_nanos() as u64;
        while c.parallel_at(now) {
            c.record(1, 0, now);
            now += 1;
        }
        assert_eq!(c.last_spell(), SERIAL_SPELL);
    }

    #[test]
    fn run_parts_runs_every_part_once_whoever_runs_it() {
        for parts in 1..6 {
            for _ in 0..200 {
                let ran: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                run_parts(parts, 2, &|i| {
                    ran[i].fetch_add(1, Ordering::SeqCst);
                });
                assert!(ran.iter().all(|r| r.load(Ordering::SeqCst) == 1), "{parts} parts");
            }
        }
    }
}
