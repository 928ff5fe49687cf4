//! Fused CPU kernels for the ensemble (ALGORITHM.md sections 2 and 3): one hidden
//! layer with forward-mode tangents as a single autograd node, the output layer's
//! product ([`WeightMatmul`]), and the small batched products of the gradient loss.
//!
//! [`HiddenLayer`]: the layer's matmul is done once for the stacked rows `[h; t]`
//! (base rows and tangent rows share `W`); then [`SiluTangent`] adds the bias to the
//! base rows and maps
//!
//! - base row `r`:          `a_r = silu(z_r)`, `z_r = y_r + b`
//! - tangent row `(j, i)`:  `t'_{j,i} = silu'(z_{start+j}) * y_{j,i}`
//!
//! in one pass over memory. Written out with candle's elementwise ops the same
//! step makes about ten full-size temporaries and a broadcast-reduce in the
//! backward pass (slow on CPU); here the backward pass is one more loop, three
//! gemm products (only those needed) and a column sum for the bias.
//!
//! A model-training step runs the same kernels outside candle's graph
//! ([`Tape`]): candle's backward pass would give each layer's input a
//! zero-filled gradient buffer and an addition on the calling thread.
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};

/// Row structure of the stacked matrix `E x (base + nt * k) x o`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SiluTangent {
    /// Number of base rows (they come first).
    pub base: usize,
    /// First base row that has tangents.
    pub start: usize,
    /// Directions per tangent point.
    pub k: usize,
}

/// Element type of the kernel. `f32` uses a branch-free exponential that the
/// compiler vectorises (about 1 ulp; candle's and libm's `expf` are scalar);
/// `f64` uses the exact one (the exactness tests run in f64).
trait Real:
    WithDType
    + 'static
    + Copy
    + std::ops::Add<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::AddAssign
{
    const ZERO: Self;
    const ONE: Self;
    const TWO: Self;
    fn sigmoid(z: Self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const TWO: Self = 2.0;
    #[inline(always)]
    fn sigmoid(z: f32) -> f32 {
        1.0 / (1.0 + exp_f32(-z))
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const TWO: Self = 2.0;
    #[inline(always)]
    fn sigmoid(z: f64) -> f64 {
        1.0 / (1.0 + (-z).exp())
    }
}

/// `e^x` for f32 without branches: `x = n ln2 + r`, `|r| <= ln2 / 2`, a degree-6
/// Taylor polynomial for `e^r` (relative error below 2e-7) times `2^n` built in
/// the exponent bits. Inputs are clamped to the finite range.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `n` as an integer, read off the bits of `shifted`: it lies in [2^23, 2^24),
    // where one unit in the last place is 1, so its bit pattern minus ROUND's is
    // `n` (|n| <= 127 after the clamp). `n as i32` computes the same value but
    // does not vectorise (a saturating, NaN-checking conversion per lane: it
    // made this function about half scalar). A NaN `x` gives a NaN `p`, and so
    // a NaN result, as before.
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let bits = (n_int.wrapping_add(127) as u32) << 23;
    p * f32::from_bits(bits)
}

fn dims3(l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    l.shape().dims3()
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("silu-tangent: input must be contiguous".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

impl SiluTangent {
    fn check(&self, rows: usize) -> candle_core::Result<usize> {
        if self.k == 0 || rows < self.base || !(rows - self.base).is_multiple_of(self.k) {
            candle_core::bail!("silu-tangent: {rows} rows do not split into {} base rows and k = {}", self.base, self.k)
        }
        let nt = (rows - self.base) / self.k;
        if nt > 0 && self.start + nt > self.base {
            candle_core::bail!(
                "silu-tangent: tangent points {}..{} beyond the {} base rows",
                self.start,
                self.start + nt,
                self.base
            )
        }
        Ok(nt)
    }

    /// Members `0..e` of `y` (and of `b`, `om_all`): every slot of `om_all` is written.
    #[inline(always)]
    fn fwd_impl<T: Real>(
        &self,
        y: &[T],
        b: &[T],
        om_all: &mut [MaybeUninit<T>],
        e: usize,
        rows: usize,
        o: usize,
    ) -> candle_core::Result<()> {
        let nt = self.check(rows)?;
        let mut d = vec![T::ZERO; o];
        for m in 0..e {
            let ym = &y[m * rows * o..(m + 1) * rows * o];
            let bm = &b[m * o..(m + 1) * o];
            let om = &mut om_all[m * rows * o..(m + 1) * rows * o];
            for r in 0..self.base {
                let yr = &ym[r * o..(r + 1) * o];
                if r < self.start || r >= self.start + nt {
                    let or = &mut om[r * o..(r + 1) * o];
                    for c in 0..o {
                        let z = yr[c] + bm[c];
                        or[c] = MaybeUninit::new(z * T::sigmoid(z));
                    }
                    continue;
                }
                // A point with tangents: silu and silu'(z) = s (1 + z (1 - s)) from one sigmoid.
                let or = &mut om[r * o..(r + 1) * o];
                for c in 0..o {
                    let z = yr[c] + bm[c];
                    let s = T::sigmoid(z);
                    or[c] = MaybeUninit::new(z * s);
                    d[c] = s * (T::ONE + z * (T::ONE - s));
                }
                let j = r - self.start;
                for i in 0..self.k {
                    let tr = self.base + j * self.k + i;
                    let (yt, ot) = (&ym[tr * o..(tr + 1) * o], &mut om[tr * o..(tr + 1) * o]);
                    for c in 0..o {
                        ot[c] = MaybeUninit::new(d[c] * yt[c]);
                    }
                }
            }
        }
        // `check` ensured rows = base + nt * k with the tangent points inside the base
        // rows, so the loops above wrote every base row and every tangent row.
        Ok(())
    }

    /// `d loss / d y` from `g = d loss / d out`.
    /// Members `0..e`, as [`fwd_impl`](Self::fwd_impl): every slot of `gy_all` is written.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn bwd_impl<T: Real>(
        &self,
        y: &[T],
        b: &[T],
        g: &[T],
        gy_all: &mut [MaybeUninit<T>],
        e: usize,
        rows: usize,
        o: usize,
    ) -> candle_core::Result<()> {
        let nt = self.check(rows)?;
        let mut d = vec![T::ZERO; o];
        let mut dd = vec![T::ZERO; o];
        let mut acc = vec![T::ZERO; o];
        for m in 0..e {
            let off = m * rows * o;
            let (ym, gm) = (&y[off..off + rows * o], &g[off..off + rows * o]);
            let bm = &b[m * o..(m + 1) * o];
            let gym = &mut gy_all[off..off + rows * o];
            for r in 0..self.base {
                let (yr, gr) = (&ym[r * o..(r + 1) * o], &gm[r * o..(r + 1) * o]);
                if r < self.start || r >= self.start + nt {
                    // No tangents from this row: only silu'.
                    let gyr = &mut gym[r * o..(r + 1) * o];
                    for c in 0..o {
                        let z = yr[c] + bm[c];
                        let s = T::sigmoid(z);
                        gyr[c] = MaybeUninit::new(gr[c] * (s * (T::ONE + z * (T::ONE - s))));
                    }
                    continue;
                }
                for c in 0..o {
                    let z = yr[c] + bm[c];
                    let s = T::sigmoid(z);
                    d[c] = s * (T::ONE + z * (T::ONE - s));
                    // silu''(z) = s (1 - s) (2 + z (1 - 2 s))
                    dd[c] = s * (T::ONE - s) * (T::TWO + z * (T::ONE - T::TWO * s));
                    acc[c] = gr[c] * d[c];
                }
                let j = r - self.start;
                for i in 0..self.k {
                    let tr = self.base + j * self.k + i;
                    let (yt, gt) = (&ym[tr * o..(tr + 1) * o], &gm[tr * o..(tr + 1) * o]);
                    let gyt = &mut gym[tr * o..(tr + 1) * o];
                    for c in 0..o {
                        // t' = silu'(z) u: dL/du = g silu'(z), dL/dz += g u silu''(z).
                        acc[c] += gt[c] * yt[c] * dd[c];
                        gyt[c] = MaybeUninit::new(gt[c] * d[c]);
                    }
                }
                let gyr = &mut gym[r * o..(r + 1) * o];
                for c in 0..o {
                    gyr[c] = MaybeUninit::new(acc[c]);
                }
            }
        }
        // As in `fwd_impl`, every base row and every tangent row was written.
        Ok(())
    }
}

/// An output buffer the kernels fill completely, so it is not zeroed first (a
/// zeroing pass costs about as much as the activation itself).
struct Uninit<T>(Vec<MaybeUninit<T>>);

impl<T> Uninit<T> {
    fn new(n: usize) -> Self {
        let mut v = Vec::with_capacity(n);
        // SAFETY: `MaybeUninit` needs no initialisation; the capacity is `n`.
        unsafe { v.set_len(n) };
        Self(v)
    }
    fn slots(&mut self) -> &mut [MaybeUninit<T>] {
        &mut self.0
    }
    /// # Safety
    /// Every slot must have been written.
    unsafe fn assume_init(self) -> Vec<T> {
        let mut v = std::mem::ManuallyDrop::new(self.0);
        let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
        // SAFETY: `MaybeUninit<T>` has the layout of `T`; the caller guarantees that
        // every element is initialised; pointer, length and capacity come from a Vec.
        unsafe { Vec::from_raw_parts(ptr.cast::<T>(), len, cap) }
    }
}

// The kernels are compiled a second time with AVX-512 (or AVX2) enabled and chosen at
// run time, so that the loops, the exponential included, are vectorised wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn fwd_avx512<T: Real>(
    op: &SiluTangent,
    y: &[T],
    b: &[T],
    out: &mut [MaybeUninit<T>],
    (e, rows, o): (usize, usize, usize),
) -> candle_core::Result<()> {
    op.fwd_impl(y, b, out, e, rows, o)
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fwd_avx2<T: Real>(
    op: &SiluTangent,
    y: &[T],
    b: &[T],
    out: &mut [MaybeUninit<T>],
    (e, rows, o): (usize, usize, usize),
) -> candle_core::Result<()> {
    op.fwd_impl(y, b, out, e, rows, o)
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn bwd_avx512<T: Real>(
    op: &SiluTangent,
    [y, b, g]: [&[T]; 3],
    out: &mut [MaybeUninit<T>],
    (e, rows, o): (usize, usize, usize),
) -> candle_core::Result<()> {
    op.bwd_impl(y, b, g, out, e, rows, o)
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bwd_avx2<T: Real>(
    op: &SiluTangent,
    [y, b, g]: [&[T]; 3],
    out: &mut [MaybeUninit<T>],
    (e, rows, o): (usize, usize, usize),
) -> candle_core::Result<()> {
    op.bwd_impl(y, b, g, out, e, rows, o)
}

impl SiluTangent {
    /// Members `0..e` into `out`, with the widest vector unit the CPU has.
    fn fwd_members<T: Real>(
        &self,
        y: &[T],
        b: &[T],
        out: &mut [MaybeUninit<T>],
        dims: (usize, usize, usize),
    ) -> candle_core::Result<()> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { fwd_avx512(self, y, b, out, dims) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                return unsafe { fwd_avx2(self, y, b, out, dims) };
            }
        }
        let (e, rows, o) = dims;
        self.fwd_impl(y, b, out, e, rows, o)
    }
    fn bwd_members<T: Real>(
        &self,
        ybg: [&[T]; 3],
        out: &mut [MaybeUninit<T>],
        dims: (usize, usize, usize),
    ) -> candle_core::Result<()> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { bwd_avx512(self, ybg, out, dims) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                return unsafe { bwd_avx2(self, ybg, out, dims) };
            }
        }
        let (e, rows, o) = dims;
        self.bwd_impl(ybg[0], ybg[1], ybg[2], out, e, rows, o)
    }
    /// All `e` members, spread over up to `threads` threads by member.
    fn fwd<T: Real>(
        &self,
        y: &[T],
        b: &[T],
        (e, rows, o): (usize, usize, usize),
        threads: usize,
    ) -> candle_core::Result<Vec<T>> {
        let mut out = Uninit::new(y.len());
        let (per, pb) = (rows * o, o);
        if e == 1 && self.plain(rows) {
            by_rows(threads, rows, o, out.slots(), |r, chunk| {
                let part = SiluTangent { base: r.len(), start: 0, k: 1 };
                part.fwd_members(&y[r.start * o..r.end * o], b, chunk, (1, r.len(), o))
            })?;
            // SAFETY: `by_rows` handed every row's slots to `fwd_members`, which writes them.
            return Ok(unsafe { out.assume_init() });
        }
        by_member(threads, e, rows * o * SILU_COST, out.slots(), per, |ms, chunk| {
            let ys = &y[ms.start * per..ms.end * per];
            let bs = &b[ms.start * pb..ms.end * pb];
            self.fwd_members(ys, bs, chunk, (ms.len(), rows, o))
        })?;
        // SAFETY: `by_member` handed every member's slots to `fwd_members`, which
        // writes all of them (or failed, and we returned above).
        Ok(unsafe { out.assume_init() })
    }
    fn bwd<T: Real>(
        &self,
        [y, b, g]: [&[T]; 3],
        (e, rows, o): (usize, usize, usize),
        threads: usize,
    ) -> candle_core::Result<Vec<T>> {
        let mut gy = Uninit::new(y.len());
        let (per, pb) = (rows * o, o);
        if e == 1 && self.plain(rows) {
            by_rows(threads, rows, o, gy.slots(), |r, chunk| {
                let part = SiluTangent { base: r.len(), start: 0, k: 1 };
                let rr = r.start * o..r.end * o;
                part.bwd_members([&y[rr.clone()], b, &g[rr]], chunk, (1, r.len(), o))
            })?;
            // SAFETY: as in `fwd`.
            return Ok(unsafe { gy.assume_init() });
        }
        by_member(threads, e, rows * o * SILU_COST, gy.slots(), per, |ms, chunk| {
            let r = ms.start * per..ms.end * per;
            let bs = &b[ms.start * pb..ms.end * pb];
            self.bwd_members([&y[r.clone()], bs, &g[r]], chunk, (ms.len(), rows, o))
        })?;
        // SAFETY: as in `fwd`.
        Ok(unsafe { gy.assume_init() })
    }
}

impl SiluTangent {
    /// No tangent rows: every row is mapped on its own, so any block of rows can be.
    fn plain(&self, rows: usize) -> bool {
        self.k == 1 && self.start == 0 && rows == self.base
    }
}

/// Runs `f(rows, slots)` for contiguous blocks of the `rows` rows (`per` slots
/// each) of one member's output, the blocks spread over the helper threads of
/// [`crate::split`] (a rollout's or policy update's rows of one elite); below
/// [`crate::split::MIN_SPLIT_WORK`] all on the calling thread. Each row is computed by the
/// same code whichever block it lands in.
fn by_rows<S: Send, F>(threads: usize, rows: usize, per: usize, out: &mut [S], f: F) -> candle_core::Result<()>
where
    F: Fn(std::ops::Range<usize>, &mut [S]) -> candle_core::Result<()> + Sync,
{
    let parts = threads.min(rows / 8).min(rows * per * SILU_COST / crate::split::MIN_SPLIT_WORK);
    if parts <= 1 {
        return f(0..rows, out);
    }
    let mut chunks = Vec::with_capacity(parts);
    let mut rest = out;
    for i in 0..parts {
        let (a, b) = (rows * i / parts, rows * (i + 1) / parts);
        let (chunk, tail) = rest.split_at_mut((b - a) * per);
        chunks.push(std::sync::Mutex::new((a..b, chunk, Ok(()))));
        rest = tail;
    }
    crate::split::run_parts(parts, threads, &|i| {
        let mut slot = chunks[i].lock().unwrap_or_else(|p| p.into_inner());
        let (r, chunk, res) = &mut *slot;
        *res = f(r.clone(), chunk);
    });
    chunks.into_iter().try_for_each(|c| c.into_inner().unwrap_or_else(|p| p.into_inner()).2)
}

/// Below this many multiply-adds (or their equivalent) per call the work stays on
/// the calling thread: starting a thread costs tens of microseconds.
const MIN_PARALLEL_WORK: usize = 1 << 17;

/// The cost of one element of the [`SiluTangent`] map in multiply-adds (a sigmoid).
const SILU_COST: usize = 16;

/// Runs `f(members, slots)` for contiguous groups of the `e` members of a
/// member-major output (`per` slots each), one group per thread, at most `threads`
/// groups; `work` is the cost per member, for [`MIN_PARALLEL_WORK`].
///
/// Every member's numbers are computed by the same code on the same inputs
/// whichever group it lands in, so the result does not depend on `threads`. Plain
/// scoped threads, not rayon's pool: those workers spin while they wait, which on a
/// busy machine costs more than it gains.
pub(crate) fn by_member<S: Send, F>(
    threads: usize,
    e: usize,
    work: usize,
    out: &mut [S],
    per: usize,
    f: F,
) -> candle_core::Result<()>
where
    F: Fn(std::ops::Range<usize>, &mut [S]) -> candle_core::Result<()> + Sync,
{
    let t = threads.min(e);
    if t <= 1 || e.saturating_mul(work) < MIN_PARALLEL_WORK {
        return f(0..e, out);
    }
    let size = e.div_ceil(t);
    let cuts: Vec<usize> = (0..=e.div_ceil(size)).map(|j| (j * size).min(e)).collect();
    run_groups(chunks_at(out, &cuts, per), |(ms, chunk)| f(ms, chunk))
}

/// `out` (`per` slots per unit) cut at the increasing unit boundaries `cuts`
/// (from 0 to the last unit): each block's units and slots.
fn chunks_at<'a, S>(out: &'a mut [S], cuts: &[usize], per: usize) -> Vec<(std::ops::Range<usize>, &'a mut [S])> {
    let mut chunks = Vec::with_capacity(cuts.len().saturating_sub(1));
    let mut rest = out;
    for w in cuts.windows(2) {
        let (chunk, tail) = rest.split_at_mut((w[1] - w[0]) * per);
        chunks.push((w[0]..w[1], chunk));
        rest = tail;
    }
    chunks
}

/// Runs `f` on every group at the same time, the first on the calling thread and
/// each other on a scoped thread of its own; the first error, or a group's panic,
/// is passed on.
fn run_groups<P: Send, F>(groups: Vec<P>, f: F) -> candle_core::Result<()>
where
    F: Fn(P) -> candle_core::Result<()> + Sync,
{
    std::thread::scope(|s| {
        let mut groups = groups.into_iter();
        let own = groups.next();
        let f = &f;
        let handles: Vec<_> = groups.map(|g| s.spawn(move || f(g))).collect();
        let mut result = match own {
            Some(g) => f(g),
            None => Ok(()),
        };
        for h in handles {
            match h.join() {
                Ok(r) => result = result.and(r),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        result
    })
}

/// Where `t` threads' shares of the output rows of `e` products of `m x n` (depth
/// `k`) begin and end, in member-major row order (member `q`'s row `r` is row
/// `q m + r`): `t + 1` increasing cuts from 0 to `e m`, each near `e m j / t`, so
/// every thread gets the same number of rows however `e` and `t` divide.
///
/// A cut inside a member splits that member's product by rows, which gives every
/// element the bits of the whole product only under [`crate::split`]'s rule
/// (depth at most [`crate::split::MAX_SPLIT_DEPTH`] and more than 2, parts of at
/// least 2 rows and more than 256 elements). Where a part would break it, the cut
/// moves to the nearest member boundary (with seven members on two threads: 4 and
/// 3 members, where an exact split gives 3.5 each).
fn row_cuts(e: usize, (m, n, k): (usize, usize, usize), t: usize) -> Vec<usize> {
    let total = e * m;
    let t = t.clamp(1, total.max(1));
    let exact = k > 2 && k <= crate::split::MAX_SPLIT_DEPTH && n >= 2;
    let min_rows = 2usize.max(257usize.div_ceil(n.max(1)));
    let mut cuts = vec![0];
    for j in 1..t {
        let (c, last) = (total * j / t, *cuts.last().unwrap_or(&0));
        let (q, r) = (c / m, c % m);
        // The member's part before the cut starts at its first row or at the cut
        // before, if that one falls inside the same member.
        let before = c.saturating_sub(last.max(q * m));
        let c = if r == 0 || (exact && before >= min_rows && m - r >= min_rows) {
            c
        } else if r * 2 < m {
            q * m
        } else {
            (q + 1) * m
        };
        if c > last && c < total {
            cuts.push(c);
        }
    }
    cuts.push(total);
    cuts
}

/// Rows `rows` (member-major, as [`row_cuts`]) of the `e` products `lhs_q rhs_q`
/// (`m x k` by `k x n`) written into `chunk`, their `n` slots each in order: each
/// member's part by one gemm call of its rows.
///
/// # Safety
/// The operands must hold their `e` matrices (as [`Operand::extent`]); `chunk`
/// must have `rows.len() * n` slots.
unsafe fn gemm_rows<T: Real>(
    rows: std::ops::Range<usize>,
    (m, n, k): (usize, usize, usize),
    (lhs, rhs): (&Operand<T>, &Operand<T>),
    chunk: &mut [MaybeUninit<T>],
    parallelism: gemm::Parallelism,
) {
    let dst = chunk.as_mut_ptr().cast::<T>();
    let mut row = rows.start;
    while row < rows.end {
        let (q, a) = (row / m, row % m);
        let b = m.min(a + rows.end - row);
        // SAFETY: member `q`'s rows `a..b` lie inside the operands (the caller's
        // extents); their `(b - a) n` destination slots start at `row - rows.start`
        // rows into `chunk`, and gemm with `read_dst = false` only writes them,
        // each element once.
        unsafe {
            gemm::gemm(
                b - a,
                n,
                k,
                dst.add((row - rows.start) * n),
                1,
                n as isize,
                false,
                lhs.data.as_ptr().add(q * lhs.skip + a * lhs.rs),
                lhs.cs as isize,
                lhs.rs as isize,
                rhs.data.as_ptr().add(q * rhs.skip),
                rhs.cs as isize,
                rhs.rs as isize,
                T::ZERO,
                T::ONE,
                false,
                false,
                false,
                parallelism,
            );
        }
        row += b - a;
    }
}

/// One hidden layer on CPU as a single graph node: `y = h W` (one matmul for the
/// stacked base and tangent rows), then the [`SiluTangent`] map with the bias.
///
/// The pre-activation `y` is kept inside the op for the backward pass instead of
/// being a node of its own: candle gives every node's gradient a zero-filled buffer
/// and an addition, two full passes over `rows x hidden` that cost about as much as
/// the activation. The backward pass also forms only the gradients that are used:
/// none for `h` when it is data (the first layer), none for `W` and `b` when they are
/// constants (a frozen view).
pub(crate) struct HiddenLayer {
    op: SiluTangent,
    /// Threads the members are spread over ([`by_member`]).
    threads: usize,
    y: std::sync::Mutex<Option<CpuStorage>>,
}

impl HiddenLayer {
    pub(crate) fn new(op: SiluTangent, threads: usize) -> Self {
        Self { op, threads, y: std::sync::Mutex::new(None) }
    }
}

fn cpu_slice<'a, T: WithDType>(s: &'a candle_core::Storage, l: &Layout) -> candle_core::Result<&'a [T]> {
    match s {
        candle_core::Storage::Cpu(c) => contiguous(c, l),
        _ => candle_core::bail!("hidden-layer: CPU tensors only"),
    }
}

/// One operand of [`batched_gemm`]: the data of `e` matrices `skip` apart, and the
/// strides between columns and rows of each.
struct Operand<'a, T> {
    data: &'a [T],
    skip: usize,
    cs: usize,
    rs: usize,
}

impl<T> Operand<'_, T> {
    /// The highest element index `e` matrices of `rows x cols` read, plus one.
    fn extent(&self, e: usize, rows: usize, cols: usize) -> usize {
        (e - 1) * self.skip + (rows - 1) * self.rs + (cols - 1) * self.cs + 1
    }
}

/// An error, not a read out of bounds, when an operand of `e` products `(m x k)
/// (k x n)` is shorter than its strided extent.
fn check_extents<T>(
    e: usize,
    (m, n, k): (usize, usize, usize),
    (lhs, rhs): (&Operand<T>, &Operand<T>),
) -> candle_core::Result<()> {
    if lhs.data.len() < lhs.extent(e, m, k) || rhs.data.len() < rhs.extent(e, k, n) {
        candle_core::bail!("batched-gemm: operand smaller than {e} x ({m} x {k}) ({k} x {n})")
    }
    Ok(())
}

/// `e` products `(m x k) (k x n)` with gemm (candle's own matmul kernel), written
/// straight into a fresh buffer: candle zero-fills its product buffer first, a full
/// extra pass over memory for each of the three products of a layer. The output
/// rows are shared evenly over `threads` threads ([`row_cuts`]: a member's product
/// split by rows where that gives the same bits, else whole members).
fn batched_gemm<T: Real>(
    e: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Operand<T>,
    rhs: Operand<T>,
    threads: usize,
) -> candle_core::Result<Vec<T>> {
    if e == 0 || m == 0 || n == 0 || k == 0 {
        return Ok(vec![T::ZERO; e * m * n]);
    }
    check_extents(e, (m, n, k), (&lhs, &rhs))?;
    if e == 1 {
        // One member (a rollout's or policy update's rows of one elite): its product
        // split over the helper threads instead, with the same numbers.
        return crate::split::product((m, n, k), (lhs.data, (lhs.cs, lhs.rs)), (rhs.data, (rhs.cs, rhs.rs)), threads);
    }
    // With the members spread over threads each product runs on one; otherwise
    // gemm may use candle's rayon pool, as candle's own matmul does.
    let parallelism = match candle_core::utils::get_num_threads() {
        t if t > 1 && threads <= 1 => gemm::Parallelism::Rayon(t),
        _ => gemm::Parallelism::None,
    };
    let mut out = Uninit::new(e * m * n);
    let (lhs, rhs) = (&lhs, &rhs);
    let t = if e.saturating_mul(m * n * k) < MIN_PARALLEL_WORK { 1 } else { threads };
    let cuts = row_cuts(e, (m, n, k), t);
    run_groups(chunks_at(out.slots(), &cuts, n), |(rows, chunk)| {
        // SAFETY: the extents checked above; `chunk` holds the group's rows.
        unsafe { gemm_rows(rows, (m, n, k), (lhs, rhs), chunk, parallelism) };
        Ok(())
    })?;
    // SAFETY: the groups' rows cover all `e m` rows, and gemm wrote every element.
    Ok(unsafe { out.assume_init() })
}

impl HiddenLayer {
    fn fwd_t<T: Real>(
        &self,
        h: &[T],
        w: &[T],
        b: &[T],
        (e, rows, k, o): (usize, usize, usize, usize),
    ) -> candle_core::Result<(Vec<T>, Vec<T>)> {
        let lhs = Operand { data: h, skip: rows * k, cs: 1, rs: k };
        let rhs = Operand { data: w, skip: k * o, cs: 1, rs: o };
        let y = batched_gemm(e, (rows, o, k), lhs, rhs, self.threads)?;
        let out = self.op.fwd(&y, b, (e, rows, o), self.threads)?;
        Ok((y, out))
    }

    /// `(dL/dh, dL/dW, dL/db)`, each only when `want` says so.
    #[allow(clippy::type_complexity)]
    fn bwd_t<T: Real>(
        &self,
        [h, w, b, y, g]: [&[T]; 5],
        (e, rows, k, o): (usize, usize, usize, usize),
        want: [bool; 3],
    ) -> candle_core::Result<(Option<Vec<T>>, Option<Vec<T>>, Option<Vec<T>>)> {
        let gy = self.op.bwd([y, b, g], (e, rows, o), self.threads)?;
        let (gh, gw) = product_grads([h, w, &gy], (e, rows, k, o), [want[0], want[1]], self.threads)?;
        // The bias gradient: column sums of gy over the base rows.
        let gb = if want[2] {
            let mut gb = vec![T::ZERO; e * o];
            for m in 0..e {
                let acc = &mut gb[m * o..(m + 1) * o];
                for r in 0..self.op.base {
                    let row = &gy[(m * rows + r) * o..(m * rows + r + 1) * o];
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v;
                    }
                }
            }
            Some(gb)
        } else {
            None
        };
        Ok((gh, gw, gb))
    }
}

fn hidden_dims(l1: &Layout, l2: &Layout, l3: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (e, rows, k) = dims3(l1)?;
    let (e2, k2, o) = dims3(l2)?;
    let (e3, one, o3) = dims3(l3)?;
    if e2 != e || k2 != k || e3 != e || one != 1 || o3 != o {
        candle_core::bail!("hidden-layer: h {:?}, W {:?}, b {:?}", l1.dims(), l2.dims(), l3.dims())
    }
    Ok((e, rows, k, o))
}

impl CustomOp3 for HiddenLayer {
    fn name(&self) -> &'static str {
        "hidden-layer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = hidden_dims(l1, l2, l3)?;
        let (y, out) = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (y, out) =
                    self.fwd_t::<f32>(contiguous(s1, l1)?, contiguous(s2, l2)?, contiguous(s3, l3)?, dims)?;
                (CpuStorage::F32(y), CpuStorage::F32(out))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (y, out) =
                    self.fwd_t::<f64>(contiguous(s1, l1)?, contiguous(s2, l2)?, contiguous(s3, l3)?, dims)?;
                (CpuStorage::F64(y), CpuStorage::F64(out))
            }
            _ => candle_core::bail!("hidden-layer: f32 or f64 inputs of one dtype"),
        };
        *self.y.lock().map_err(|_| candle_core::Error::Msg("hidden-layer: lock poisoned".into()))? = Some(y);
        let (e, rows, _, o) = dims;
        Ok((out, Shape::from((e, rows, o))))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.grads([h, w, b, g], [h.track_op(), w.track_op(), b.track_op()], 0.0)
    }
}

impl HiddenLayer {
    /// The backward pass of the forward pass this op last ran, for the output
    /// gradient `g`: `(dL/dh, dL/dW, dL/db)`, each only when `want` says so; the
    /// weight decay `d`'s gradient is added to `dL/dW` ([`add_decay`]; 0: none).
    #[allow(clippy::type_complexity)]
    fn grads(
        &self,
        [h, w, b, g]: [&Tensor; 4],
        want: [bool; 3],
        d: f64,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (h, w, b, g) = (h.contiguous()?, w.contiguous()?, b.contiguous()?, g.contiguous()?);
        let dims = hidden_dims(h.layout(), w.layout(), b.layout())?;
        let saved = self.y.lock().map_err(|_| candle_core::Error::Msg("hidden-layer: lock poisoned".into()))?;
        let y = saved.as_ref().ok_or_else(|| candle_core::Error::Msg("hidden-layer: no forward pass".into()))?;
        let ((hs, hl), (ws, wl), (bs, bl), (gs, gl)) =
            (h.storage_and_layout(), w.storage_and_layout(), b.storage_and_layout(), g.storage_and_layout());
        let (e, rows, k, o) = dims;
        let dev = h.device();
        macro_rules! grads {
            ($t:ty, $y:expr) => {{
                let ws = cpu_slice(&ws, wl)?;
                let (gh, gw, gb) = self.bwd_t::<$t>(
                    [cpu_slice(&hs, hl)?, ws, cpu_slice(&bs, bl)?, $y, cpu_slice(&gs, gl)?],
                    dims,
                    want,
                )?;
                (
                    gh.map(|v| Tensor::from_vec(v, (e, rows, k), dev)).transpose()?,
                    gw.map(|mut v| {
                        add_decay(&mut v, ws, d);
                        Tensor::from_vec(v, (e, k, o), dev)
                    })
                    .transpose()?,
                    gb.map(|v| Tensor::from_vec(v, (e, 1, o), dev)).transpose()?,
                )
            }};
        }
        Ok(match y {
            CpuStorage::F32(y) => grads!(f32, y),
            CpuStorage::F64(y) => grads!(f64, y),
            _ => candle_core::bail!("hidden-layer: f32 or f64 only"),
        })
    }
}

/// `x W`, the ensemble's output layer (no activation): the product candle's
/// `Tensor::matmul` forms, with the members spread over threads ([`by_member`]) or
/// one member's rows split ([`crate::split`]), where candle's matmul runs the members
/// one after another on the calling thread. The backward pass forms only the
/// gradients that are used: none for `W` when it is a constant (a frozen view),
/// where candle's matmul backward always forms both operands' (`x^T g`, as costly as
/// the product itself).
pub(crate) struct WeightMatmul {
    pub threads: usize,
}

fn product_dims(l1: &Layout, l2: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (e, rows, k) = dims3(l1)?;
    let (e2, k2, o) = dims3(l2)?;
    if e != e2 || k != k2 {
        candle_core::bail!("weight-matmul: {:?} times {:?}", l1.dims(), l2.dims())
    }
    Ok((e, rows, k, o))
}

/// The gradients of `y = h W` (`e` members, `h`: `rows x k`, `W`: `k x o`) for the
/// output gradient `gy`: `(gy W^T, h^T gy)`, each only when `want` says so.
///
/// With both wanted and the members spread over threads, the `2 e` products are
/// shared out whole, as equal halves of the list `gh_0, gW_0, gh_1, gW_1, ...` (the
/// two products of a member have the same FLOPs): the weight gradient's depth is
/// the `rows`, too deep to split a member's product by rows with the same bits
/// ([`row_cuts`]), so with seven members on two threads each thread takes three
/// members' pairs and one of the fourth member's two products.
#[allow(clippy::type_complexity)]
fn product_grads<T: Real>(
    [h, w, gy]: [&[T]; 3],
    (e, rows, k, o): (usize, usize, usize, usize),
    want: [bool; 2],
    threads: usize,
) -> candle_core::Result<(Option<Vec<T>>, Option<Vec<T>>)> {
    // gy W^T: W^T's element (j, c) is W[c * o + j].
    let gh_ops = (Operand { data: gy, skip: rows * o, cs: 1, rs: o }, Operand { data: w, skip: k * o, cs: o, rs: 1 });
    // h^T gy: h^T's element (c, r) is h[r * k + c].
    let gw_ops =
        (Operand { data: h, skip: rows * k, cs: k, rs: 1 }, Operand { data: gy, skip: rows * o, cs: 1, rs: o });
    let paired = want[0] && want[1] && e > 1 && threads > 1 && e.saturating_mul(2 * rows * k * o) >= MIN_PARALLEL_WORK;
    if !paired {
        let gh = want[0].then(|| batched_gemm(e, (rows, k, o), gh_ops.0, gh_ops.1, threads)).transpose()?;
        let gw = want[1].then(|| batched_gemm(e, (k, o, rows), gw_ops.0, gw_ops.1, threads)).transpose()?;
        return Ok((gh, gw));
    }
    check_extents(e, (rows, k, o), (&gh_ops.0, &gh_ops.1))?;
    check_extents(e, (k, o, rows), (&gw_ops.0, &gw_ops.1))?;
    let (mut gh, mut gw) = (Uninit::new(e * rows * k), Uninit::new(e * k * o));
    let t = threads.min(2 * e);
    let mut groups = Vec::with_capacity(t);
    let (mut rest_h, mut rest_w) = (gh.slots(), gw.slots());
    for j in 0..t {
        // Products `lo..hi` of the list: gh of members ceil(lo/2)..ceil(hi/2), gW of
        // members floor(lo/2)..floor(hi/2).
        let (lo, hi) = (2 * e * j / t, 2 * e * (j + 1) / t);
        let (mh, mw) = (lo.div_ceil(2)..hi.div_ceil(2), lo / 2..hi / 2);
        let (ch, th) = rest_h.split_at_mut(mh.len() * rows * k);
        let (cw, tw) = rest_w.split_at_mut(mw.len() * k * o);
        groups.push((mh, ch, mw, cw));
        (rest_h, rest_w) = (th, tw);
    }
    let (gh_ops, gw_ops) = (&gh_ops, &gw_ops);
    run_groups(groups, |(mh, ch, mw, cw)| {
        // SAFETY: the extents checked above; each chunk holds its members' slots.
        unsafe {
            gemm_rows(
                mh.start * rows..mh.end * rows,
                (rows, k, o),
                (&gh_ops.0, &gh_ops.1),
                ch,
                gemm::Parallelism::None,
            );
            gemm_rows(mw.start * k..mw.end * k, (k, o, rows), (&gw_ops.0, &gw_ops.1), cw, gemm::Parallelism::None);
        }
        Ok(())
    })?;
    // SAFETY: the groups' members cover `0..e` in both lists, and gemm wrote every element.
    Ok(unsafe { (Some(gh.assume_init()), Some(gw.assume_init())) })
}

impl CustomOp2 for WeightMatmul {
    fn name(&self) -> &'static str {
        "weight-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (e, rows, k, o) = product_dims(l1, l2)?;
        macro_rules! fwd {
            ($t:ty) => {
                self.product::<$t>(contiguous(s1, l1)?, contiguous(s2, l2)?, (e, rows, k, o))?
            };
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(fwd!(f32)),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(fwd!(f64)),
            _ => candle_core::bail!("weight-matmul: f32 or f64 inputs of one dtype"),
        };
        Ok((out, Shape::from((e, rows, o))))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        self.grads([h, w, g], [h.track_op(), w.track_op()], 0.0)
    }
}

impl WeightMatmul {
    /// `h W` for `e` members (`h`: `rows x k`, `W`: `k x o`, contiguous).
    fn product<T: Real>(
        &self,
        h: &[T],
        w: &[T],
        (e, rows, k, o): (usize, usize, usize, usize),
    ) -> candle_core::Result<Vec<T>> {
        let lhs = Operand { data: h, skip: rows * k, cs: 1, rs: k };
        let rhs = Operand { data: w, skip: k * o, cs: 1, rs: o };
        batched_gemm(e, (rows, o, k), lhs, rhs, self.threads)
    }

    /// `(dL/dh, dL/dW)` for the output gradient `g`, each only when `want` says
    /// so; the weight decay `d`'s gradient is added to `dL/dW` ([`add_decay`]; 0: none).
    fn grads(
        &self,
        [h, w, g]: [&Tensor; 3],
        want: [bool; 2],
        d: f64,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (h, w, g) = (h.contiguous()?, w.contiguous()?, g.contiguous()?);
        let dims = product_dims(h.layout(), w.layout())?;
        let ((hs, hl), (ws, wl), (gs, gl)) = (h.storage_and_layout(), w.storage_and_layout(), g.storage_and_layout());
        let (e, rows, k, o) = dims;
        let dev = h.device();
        macro_rules! grads {
            ($t:ty) => {{
                let slices = [cpu_slice::<$t>(&hs, hl)?, cpu_slice::<$t>(&ws, wl)?, cpu_slice::<$t>(&gs, gl)?];
                let (gh, gw) = product_grads(slices, dims, want, self.threads)?;
                (
                    gh.map(|v| Tensor::from_vec(v, (e, rows, k), dev)).transpose()?,
                    gw.map(|mut v| {
                        add_decay(&mut v, slices[1], d);
                        Tensor::from_vec(v, (e, k, o), dev)
                    })
                    .transpose()?,
                )
            }};
        }
        Ok(match h.dtype() {
            candle_core::DType::F32 => grads!(f32),
            candle_core::DType::F64 => grads!(f64),
            d => candle_core::bail!("weight-matmul: f32 or f64 only, got {d:?}"),
        })
    }
}

/// Many small products at once: `out_p = V_p J_p` for `V`: `P x k x in` and `J`:
/// `P x in x out` (the contraction of the Jacobian columns with the directions in
/// [`crate::ProbabilisticEnsemble`]'s gradient loss). candle's batched matmul makes
/// one gemm call per product, whose fixed cost dominates at these sizes (a few
/// dozen multiply-adds each, thousands of products per minibatch).
#[derive(Clone, Copy)]
pub(crate) enum SmallProduct {
    /// `(V, J) -> V J`
    Forward,
    /// `(G, J) -> G J^T`, the gradient for `V`.
    GradLhs,
    /// `(V, G) -> V^T G`, the gradient for `J`.
    GradRhs,
}

/// One of the [`SmallProduct`]s, its `P` products spread over up to `threads`
/// threads ([`by_member`]: each product is computed the same way on any thread).
#[derive(Clone, Copy)]
pub(crate) struct SmallBatchedMatmul {
    pub kind: SmallProduct,
    pub threads: usize,
}

impl SmallProduct {
    /// Products `qs` of `a` and `b` into `out` (zeroed, the products' outputs only).
    #[allow(clippy::too_many_arguments)]
    fn run<T: Real>(
        self,
        a: &[T],
        b: &[T],
        qs: std::ops::Range<usize>,
        k: usize,
        ind: usize,
        od: usize,
        out: &mut [T],
    ) {
        let q0 = qs.start;
        match self {
            SmallProduct::Forward => {
                for q in qs {
                    let j = &b[q * ind * od..(q + 1) * ind * od];
                    for i in 0..k {
                        let r = (q - q0) * k + i;
                        let o = &mut out[r * od..(r + 1) * od];
                        let v = &a[(q * k + i) * ind..(q * k + i + 1) * ind];
                        for c in 0..ind {
                            let (s, jc) = (v[c], &j[c * od..(c + 1) * od]);
                            for (oo, &jj) in o.iter_mut().zip(jc) {
                                *oo += s * jj;
                            }
                        }
                    }
                }
            }
            SmallProduct::GradLhs => {
                for q in qs {
                    let j = &b[q * ind * od..(q + 1) * ind * od];
                    for i in 0..k {
                        let g = &a[(q * k + i) * od..(q * k + i + 1) * od];
                        let r = (q - q0) * k + i;
                        let o = &mut out[r * ind..(r + 1) * ind];
                        for c in 0..ind {
                            let mut acc = T::ZERO;
                            for (&gg, &jj) in g.iter().zip(&j[c * od..(c + 1) * od]) {
                                acc += gg * jj;
                            }
                            o[c] = acc;
                        }
                    }
                }
            }
            SmallProduct::GradRhs => {
                for q in qs {
                    let o = &mut out[(q - q0) * ind * od..(q - q0 + 1) * ind * od];
                    for i in 0..k {
                        let v = &a[(q * k + i) * ind..(q * k + i + 1) * ind];
                        let g = &b[(q * k + i) * od..(q * k + i + 1) * od];
                        for c in 0..ind {
                            let s = v[c];
                            for (oo, &gg) in o[c * od..(c + 1) * od].iter_mut().zip(g) {
                                *oo += s * gg;
                            }
                        }
                    }
                }
            }
        }
    }
}

impl SmallBatchedMatmul {
    fn run<T: Real>(self, a: &[T], b: &[T], p: usize, k: usize, ind: usize, od: usize) -> candle_core::Result<Vec<T>> {
        let per = match self.kind {
            SmallProduct::Forward => k * od,
            SmallProduct::GradLhs => k * ind,
            SmallProduct::GradRhs => ind * od,
        };
        let mut out = vec![T::ZERO; p * per];
        by_member(self.threads, p, k * ind * od, &mut out, per, |qs, chunk| {
            self.kind.run(a, b, qs, k, ind, od, chunk);
            Ok(())
        })?;
        Ok(out)
    }
}

impl CustomOp2 for SmallBatchedMatmul {
    fn name(&self) -> &'static str {
        "small-batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (p, a1, a2) = dims3(l1)?;
        let (p2, b1, b2) = dims3(l2)?;
        // (P, k, in, out) and the output shape for each kind.
        let (k, ind, od, shape) = match self.kind {
            SmallProduct::Forward if a2 == b1 => (a1, a2, b2, (p, a1, b2)),
            SmallProduct::GradLhs if a2 == b2 => (a1, b1, b2, (p, a1, b1)),
            SmallProduct::GradRhs if a1 == b1 => (a1, a2, b2, (p, a2, b2)),
            _ => candle_core::bail!("small-batched-matmul: {:?} and {:?}", l1.dims(), l2.dims()),
        };
        if p != p2 {
            candle_core::bail!("small-batched-matmul: {:?} and {:?}", l1.dims(), l2.dims())
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(self.run::<f32>(contiguous(s1, l1)?, contiguous(s2, l2)?, p, k, ind, od)?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(self.run::<f64>(contiguous(s1, l1)?, contiguous(s2, l2)?, p, k, ind, od)?)
            }
            _ => candle_core::bail!("small-batched-matmul: f32 or f64 inputs of one dtype"),
        };
        Ok((out, Shape::from(shape)))
    }

    fn bwd(
        &self,
        v: &Tensor,
        j: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let op = |kind| SmallBatchedMatmul { kind, threads: self.threads };
        // The directions are data in training; their gradient only when asked for.
        let gv = if v.track_op() { Some(g.apply_op2_no_bwd(j, &op(SmallProduct::GradLhs))?) } else { None };
        let gj = if j.track_op() { Some(v.apply_op2_no_bwd(&g, &op(SmallProduct::GradRhs))?) } else { None };
        Ok((gv, gj))
    }
}

/// A training step's hidden stack and output-layer product run outside candle's
/// graph, on the same kernels ([`HiddenLayer`], [`WeightMatmul`]) with the same
/// operands, so the same numbers.
///
/// Why: candle's backward pass gives the gradient of every graph node a
/// zero-filled buffer and then adds the op's gradient into it, two passes over
/// memory on one thread. For the hidden activations (`E x rows x hidden`: 10 MB
/// per layer for Ant's gradient ensemble, 1,792 stacked rows) that was a sixth of
/// an epoch. Here the graph starts at the output layer's product `y`, a variable:
/// candle's backward pass forms the loss's gradient for `y` (and for the head's
/// parameters), then [`Tape::backward`] runs the layers' backward passes and
/// adds their parameter gradients, and the weight decay's, to candle's.
///
/// The gradients are those of the whole graph: each activation has one consumer
/// (its gradient is the op's, where candle formed `0 + g`, the same number up to
/// the sign of a zero), and a weight's two terms (its layer's and the weight
/// decay's) are added as candle adds them (two terms: the order does not matter).
pub(crate) struct Tape {
    /// The output layer's product.
    out: WeightMatmul,
    /// Per hidden layer: the op (it keeps its pre-activation `h W`), its input,
    /// weight and bias.
    hidden: Vec<(HiddenLayer, [Tensor; 3])>,
    /// The output layer's input and weight.
    last: (Tensor, Tensor),
    /// `last.0 · last.1`, where candle's graph begins.
    y: Tensor,
    /// Per layer (the output layer last), the weight decay `d` whose gradient
    /// the tape adds ([`decay`](Self::decay)); 0: none.
    decay: Vec<f64>,
}

/// `gw + ((w c) 2 + 0)` element by element, `c = 0.5 d`: the layer's gradient
/// plus that of the weight decay `0.5 d sum(w^2)` formed as candle's backward
/// pass forms it (the scalar's gradient `1 c + 0`, then `sqr`'s `(w g) 2 + 0`),
/// added as candle adds a weight's two gradients (two terms: either order).
fn add_decay<T: Real>(gw: &mut [T], w: &[T], d: f64) {
    if d == 0.0 {
        return;
    }
    let c = T::ONE * T::from_f64(0.5 * d) + T::ZERO;
    for (g, &w) in gw.iter_mut().zip(w) {
        *g += (w * c) * T::TWO + T::ZERO;
    }
}

impl Tape {
    /// The forward pass of `h0` (data, `E x rows x in`) through the hidden layers
    /// `(W, b)` and the output layer's weight `w_out`; returns the tape and `y`, a
    /// variable of shape `E x rows x out`.
    pub(crate) fn forward(
        h0: &Tensor,
        hidden: &[(Tensor, Tensor)],
        w_out: &Tensor,
        op: SiluTangent,
        threads: usize,
    ) -> candle_core::Result<(Self, Tensor)> {
        let mut h = h0.detach().contiguous()?;
        let mut saved = Vec::with_capacity(hidden.len());
        for (w, b) in hidden {
            let (w, b) = (w.contiguous()?, b.contiguous()?);
            let layer = HiddenLayer::new(op, threads);
            let out = h.apply_op3_no_bwd(&w, &b, &layer)?;
            saved.push((layer, [h, w, b]));
            h = out;
        }
        let out = WeightMatmul { threads };
        let w_out = w_out.contiguous()?;
        let dims = product_dims(h.layout(), w_out.layout())?;
        let (e, rows, _, o) = dims;
        // The product's own buffer becomes the variable (no copy).
        let y = {
            let ((hs, hl), (ws, wl)) = (h.storage_and_layout(), w_out.storage_and_layout());
            macro_rules! fwd {
                ($t:ty) => {
                    candle_core::Var::from_vec(
                        out.product::<$t>(cpu_slice(&hs, hl)?, cpu_slice(&ws, wl)?, dims)?,
                        (e, rows, o),
                        h.device(),
                    )?
                };
            }
            match h.dtype() {
                candle_core::DType::F32 => fwd!(f32),
                candle_core::DType::F64 => fwd!(f64),
                d => candle_core::bail!("weight-matmul: f32 or f64 only, got {d:?}"),
            }
        };
        let y = y.as_tensor().clone();
        let decay = vec![0.0; saved.len() + 1];
        Ok((Self { out, hidden: saved, last: (h, w_out), y: y.clone(), decay }, y))
    }

    /// Layer `layer` (the output layer is the last) has the weight decay `d`:
    /// the loss holds its value (outside the graph), the tape its gradient.
    pub(crate) fn decay(&mut self, layer: usize, d: f64) {
        self.decay[layer] = d;
    }

    /// Takes `y`'s gradient out of `grads` and puts the layers' parameter
    /// gradients in (added to those already there), from the ops' own backward
    /// passes. A loss that does not read `y` is an error (the weight decay's
    /// gradients would be lost with it).
    pub(crate) fn backward(self, grads: &mut candle_core::backprop::GradStore) -> candle_core::Result<()> {
        let Some(gy) = grads.remove(&self.y) else {
            candle_core::bail!("tape: the loss did not read the output layer's product")
        };
        let (h, w) = &self.last;
        let want = [!self.hidden.is_empty(), true];
        let (mut g, gw) = self.out.grads([h, w, &gy], want, self.decay[self.hidden.len()])?;
        if let Some(gw) = gw {
            accumulate(grads, w, gw)?;
        }
        for (l, (layer, [h, w, b])) in self.hidden.iter().enumerate().rev() {
            let Some(gy) = g.take() else { break };
            let (gh, gw, gb) = layer.grads([h, w, b, &gy], [l > 0, true, true], self.decay[l])?;
            for (t, grad) in [(w, gw), (b, gb)] {
                if let Some(grad) = grad {
                    accumulate(grads, t, grad)?;
                }
            }
            g = gh;
        }
        Ok(())
    }
}

/// Adds `g` to the gradient of `t` in `grads` (or puts it there).
fn accumulate(grads: &mut candle_core::backprop::GradStore, t: &Tensor, g: Tensor) -> candle_core::Result<()> {
    let sum = match grads.remove(t) {
        Some(prev) => (prev + g)?.detach(),
        None => g,
    };
    grads.insert(t, sum);
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::{WeightMatmul, exp_f32, row_cuts};
    use candle_core::{DType, Device, Tensor, Var};

    /// A tensor of `shape` with values in [-1, 1) from a fixed linear congruential stream.
    fn tensor(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    /// Every element of `t` as the bits of its f64 value (exact for f32 and f64).
    pub(crate) fn bits(t: &Tensor) -> Vec<u64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .into_iter()
            .map(f64::to_bits)
            .collect()
    }

    /// The output layer's op gives candle's `matmul` bit for bit: the product and the
    /// gradients of both operands, for one member (its rows split over helpers) and for
    /// several (spread over threads), at 1 to 3 threads; with a constant weight only
    /// the input's gradient is formed.
    #[test]
    fn weight_matmul_equals_candles_matmul_bit_for_bit() {
        for dtype in [DType::F32, DType::F64] {
            for (e, rows, k, o) in [(1, 300, 64, 56), (7, 300, 64, 56), (3, 37, 20, 9), (2, 2, 3, 1)] {
                let h = Var::from_tensor(&tensor(1, &[e, rows, k], dtype)).unwrap();
                let w = Var::from_tensor(&tensor(2, &[e, k, o], dtype)).unwrap();
                let r = tensor(3, &[e, rows, o], dtype);
                let reference = h.as_tensor().matmul(w.as_tensor()).unwrap();
                let grads = (&reference * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let (gh, gw) = (grads.get(h.as_tensor()).unwrap(), grads.get(w.as_tensor()).unwrap());
                for threads in 1..=3 {
                    let case = format!("{dtype:?} {e}x{rows}x{k}x{o} threads {threads}");
                    let y = h.as_tensor().apply_op2(w.as_tensor(), WeightMatmul { threads }).unwrap();
                    assert_eq!(y.dims(), reference.dims(), "{case}");
                    assert_eq!(bits(&y), bits(&reference), "{case}: product");
                    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    assert_eq!(bits(g.get(h.as_tensor()).unwrap()), bits(gh), "{case}: input gradient");
                    assert_eq!(bits(g.get(w.as_tensor()).unwrap()), bits(gw), "{case}: weight gradient");
                    let fixed = w.as_tensor().detach();
                    let y = h.as_tensor().apply_op2(&fixed, WeightMatmul { threads }).unwrap();
                    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    assert_eq!(bits(g.get(h.as_tensor()).unwrap()), bits(gh), "{case}: constant weight");
                    assert!(g.get(&fixed).is_none() && g.get(w.as_tensor()).is_none(), "{case}: no weight gradient");
                }
            }
        }
    }

    /// The threads' shares of a batched product's rows: equal where a member can be
    /// cut by rows with the same bits, else at member boundaries; every member's part
    /// that is not the whole member keeps to `crate::split`'s rule.
    #[test]
    fn row_cuts_share_rows_evenly_and_split_members_only_where_exact() {
        // Ant's hidden layer, seven members on two threads: 3.5 members each.
        assert_eq!(row_cuts(7, (1792, 200, 200), 2), vec![0, 6272, 12544]);
        // The weight gradient's depth is the rows: whole members (4 and 3).
        assert_eq!(row_cuts(7, (200, 200, 1792), 2), vec![0, 800, 1400]);
        for e in 1..=7 {
            for m in [1, 2, 3, 5, 9, 40, 257, 600] {
                for n in [1, 2, 3, 56, 200] {
                    for k in [1, 2, 3, 64, 512, 513] {
                        for t in 1..=5 {
                            let cuts = row_cuts(e, (m, n, k), t);
                            let case = format!("e {e} m {m} n {n} k {k} t {t}: {cuts:?}");
                            assert_eq!((cuts[0], cuts[cuts.len() - 1]), (0, e * m), "{case}");
                            assert!(cuts.windows(2).all(|w| w[0] < w[1]) && cuts.len() <= t + 1, "{case}");
                            for w in cuts.windows(2) {
                                for q in 0..e {
                                    let (a, b) = (w[0].max(q * m), w[1].min((q + 1) * m));
                                    if a < b && b - a < m {
                                        assert!(k > 2 && k <= 512 && n >= 2, "{case}: member {q} cut");
                                        assert!(b - a >= 2 && (b - a) * n > 256, "{case}: part {a}..{b}");
                                    }
                                }
                            }
                            // Where a cut may fall inside a member, each lies within a
                            // part's least rows of the even share's.
                            let min_rows = 257usize.div_ceil(n).max(2);
                            if k > 2 && k <= 512 && n >= 2 && e * m / t >= 2 * min_rows {
                                assert_eq!(cuts.len(), t + 1, "{case}");
                                for (j, &c) in cuts.iter().enumerate() {
                                    assert!(c.abs_diff(e * m * j / t) < min_rows, "{case}: cut {j}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate_over_the_finite_range() {
        let mut worst: f64 = 0.0;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let exact = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64) - exact).abs() / exact);
            x += 0.01;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert!(exp_f32(-1000.0) >= 0.0 && exp_f32(1000.0).is_finite());
    }

    /// The exponential as it was written before its integer part was read off the
    /// bits (`n as i32`, which does not vectorise): an independent statement of
    /// the values the runs' checkpoints and recorded figures were made with.
    fn exp_f32_by_cast(x: f32) -> f32 {
        let x = x.clamp(-87.0, 88.0);
        let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
        let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
        let p =
            1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
        p * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }

    /// Every f32 bit pattern on a stride of 61 (70 million inputs: both signs, the
    /// clamp bounds, subnormals, infinities), plus the f32 between -90 and 90 on a
    /// stride of 29 (77 million more): the same bits as the cast version, NaN for
    /// NaN. (Why they agree everywhere: after the clamp `x log2 e + 1.5 * 2^23`
    /// rounds to an integer in [2^23, 2^24), whose bit pattern minus the
    /// constant's is that integer, the value `n as i32` converts.)
    #[test]
    fn fast_exp_bits_equal_the_cast_version() {
        let check = |x: f32| {
            let (a, b) = (exp_f32(x), exp_f32_by_cast(x));
            if x.is_nan() {
                assert!(a.is_nan() && b.is_nan(), "{x}");
            } else {
                assert_eq!(a.to_bits(), b.to_bits(), "exp({x:e}) = {a:e}, cast version {b:e}");
            }
        };
        for bits in (0..=u32::MAX).step_by(61) {
            check(f32::from_bits(bits));
        }
        // [-90, 90], where the clamp and the rounding of x log2 e act: denser.
        let (lo, hi) = ((-90f32).to_bits(), 90f32.to_bits());
        for bits in (0..=hi).step_by(29).chain((1u32 << 31..=lo).step_by(29)) {
            check(f32::from_bits(bits));
        }
        for x in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 88.0, -87.0, 0.0, -0.0] {
            check(x);
        }
    }
}
