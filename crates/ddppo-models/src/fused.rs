//! A fused CPU kernel for one hidden layer's activation with forward-mode
//! tangents (ALGORITHM.md section 3), and its backward pass.
//!
//! The layer's matmul is done once for the stacked rows `[h; t]` (base rows and
//! tangent rows share `W`). This op then adds the bias to the base rows and maps
//!
//! - base row `r`:          `a_r = silu(z_r)`, `z_r = y_r + b`
//! - tangent row `(j, i)`:  `t'_{j,i} = silu'(z_{start+j}) * y_{j,i}`
//!
//! in one pass over memory. Written out with candle's elementwise ops the same
//! step makes about ten full-size temporaries and a broadcast-reduce in the
//! backward pass (slow on CPU); here the backward pass is one more loop and the
//! bias gradient a ones-row matmul.
use candle_core::backend::BackendStorage;
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
    /// Whether the backward pass returns the bias gradient (not for a frozen view).
    pub bias_grad: bool,
}

/// Element type of the kernel. `f32` uses a branch-free exponential that the
/// compiler vectorises (about 1 ulp; candle's and libm's `expf` are scalar);
/// `f64` uses the exact one (the exactness tests run in f64).
trait Real:
    WithDType
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
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let bits = ((n as i32 + 127) as u32) << 23;
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
            candle_core::bail!(
                "silu-tangent: {rows} rows do not split into {} base rows and k = {}",
                self.base,
                self.k
            )
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

    #[inline(always)]
    fn fwd_impl<T: Real>(
        &self,
        y: &[T],
        b: &[T],
        e: usize,
        rows: usize,
        o: usize,
    ) -> candle_core::Result<Vec<T>> {
        let nt = self.check(rows)?;
        let mut out = vec![T::ZERO; y.len()];
        let mut d = vec![T::ZERO; o];
        for m in 0..e {
            let ym = &y[m * rows * o..(m + 1) * rows * o];
            let bm = &b[m * o..(m + 1) * o];
            let om = &mut out[m * rows * o..(m + 1) * rows * o];
            for r in 0..self.base {
                let (yr, or) = (&ym[r * o..(r + 1) * o], &mut om[r * o..(r + 1) * o]);
                for c in 0..o {
                    let z = yr[c] + bm[c];
                    or[c] = z * T::sigmoid(z);
                }
            }
            for j in 0..nt {
                let r = self.start + j;
                for c in 0..o {
                    let z = ym[r * o + c] + bm[c];
                    let s = T::sigmoid(z);
                    // silu'(z) = s (1 + z (1 - s))
                    d[c] = s * (T::ONE + z * (T::ONE - s));
                }
                for i in 0..self.k {
                    let tr = self.base + j * self.k + i;
                    let (yt, ot) = (&ym[tr * o..(tr + 1) * o], &mut om[tr * o..(tr + 1) * o]);
                    for c in 0..o {
                        ot[c] = d[c] * yt[c];
                    }
                }
            }
        }
        Ok(out)
    }

    /// `d loss / d y` from `g = d loss / d out`.
    #[inline(always)]
    fn bwd_impl<T: Real>(
        &self,
        y: &[T],
        b: &[T],
        g: &[T],
        e: usize,
        rows: usize,
        o: usize,
    ) -> candle_core::Result<Vec<T>> {
        let nt = self.check(rows)?;
        let mut gy = vec![T::ZERO; y.len()];
        for m in 0..e {
            let off = m * rows * o;
            let (ym, gm) = (&y[off..off + rows * o], &g[off..off + rows * o]);
            let bm = &b[m * o..(m + 1) * o];
            let gym = &mut gy[off..off + rows * o];
            let mut d = vec![T::ZERO; o];
            let mut dd = vec![T::ZERO; o];
            let mut acc = vec![T::ZERO; o];
            for r in 0..self.base {
                let (yr, gr) = (&ym[r * o..(r + 1) * o], &gm[r * o..(r + 1) * o]);
                for c in 0..o {
                    let z = yr[c] + bm[c];
                    let s = T::sigmoid(z);
                    d[c] = s * (T::ONE + z * (T::ONE - s));
                    // silu''(z) = s (1 - s) (2 + z (1 - 2 s))
                    dd[c] = s * (T::ONE - s) * (T::TWO + z * (T::ONE - T::TWO * s));
                }
                for c in 0..o {
                    acc[c] = gr[c] * d[c];
                }
                if nt > 0 && r >= self.start && r < self.start + nt {
                    let j = r - self.start;
                    for i in 0..self.k {
                        let tr = self.base + j * self.k + i;
                        let (yt, gt) = (&ym[tr * o..(tr + 1) * o], &gm[tr * o..(tr + 1) * o]);
                        let gyt = &mut gym[tr * o..(tr + 1) * o];
                        for c in 0..o {
                            // t' = silu'(z) u: dL/du = g silu'(z), dL/dz += g u silu''(z).
                            acc[c] += gt[c] * yt[c] * dd[c];
                            gyt[c] = gt[c] * d[c];
                        }
                    }
                }
                gym[r * o..(r + 1) * o].copy_from_slice(&acc);
            }
        }
        Ok(gy)
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
    e: usize,
    rows: usize,
    o: usize,
) -> candle_core::Result<Vec<T>> {
    op.fwd_impl(y, b, e, rows, o)
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fwd_avx2<T: Real>(
    op: &SiluTangent,
    y: &[T],
    b: &[T],
    e: usize,
    rows: usize,
    o: usize,
) -> candle_core::Result<Vec<T>> {
    op.fwd_impl(y, b, e, rows, o)
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn bwd_avx512<T: Real>(
    op: &SiluTangent,
    y: &[T],
    b: &[T],
    g: &[T],
    e: usize,
    rows: usize,
    o: usize,
) -> candle_core::Result<Vec<T>> {
    op.bwd_impl(y, b, g, e, rows, o)
}
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bwd_avx2<T: Real>(
    op: &SiluTangent,
    y: &[T],
    b: &[T],
    g: &[T],
    e: usize,
    rows: usize,
    o: usize,
) -> candle_core::Result<Vec<T>> {
    op.bwd_impl(y, b, g, e, rows, o)
}

impl SiluTangent {
    fn fwd<T: Real>(
        &self,
        y: &[T],
        b: &[T],
        e: usize,
        rows: usize,
        o: usize,
    ) -> candle_core::Result<Vec<T>> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { fwd_avx512(self, y, b, e, rows, o) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: as above.
                return unsafe { fwd_avx2(self, y, b, e, rows, o) };
            }
        }
        self.fwd_impl(y, b, e, rows, o)
    }
    fn bwd<T: Real>(
        &self,
        y: &[T],
        b: &[T],
        g: &[T],
        e: usize,
        rows: usize,
        o: usize,
    ) -> candle_core::Result<Vec<T>> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { bwd_avx512(self, y, b, g, e, rows, o) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: as above.
                return unsafe { bwd_avx2(self, y, b, g, e, rows, o) };
            }
        }
        self.bwd_impl(y, b, g, e, rows, o)
    }
}

impl CustomOp2 for SiluTangent {
    fn name(&self) -> &'static str {
        "silu-tangent"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (e, rows, o) = dims3(l1)?;
        let (e2, one, o2) = dims3(l2)?;
        if e2 != e || one != 1 || o2 != o {
            candle_core::bail!("silu-tangent: bias must be {e} x 1 x {o}")
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(self.fwd::<f32>(
                contiguous(s1, l1)?,
                contiguous(s2, l2)?,
                e,
                rows,
                o,
            )?),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(self.fwd::<f64>(
                contiguous(s1, l1)?,
                contiguous(s2, l2)?,
                e,
                rows,
                o,
            )?),
            _ => candle_core::bail!("silu-tangent: f32 or f64 inputs of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let gy = y.apply_op3_no_bwd(b, &g, &SiluTangentBwd(*self))?;
        if !self.bias_grad {
            return Ok((Some(gy), None));
        }
        // The bias gradient is the column sum over the base rows, as a ones-row matmul
        // (a reduction over the batch axis is far slower in candle on CPU).
        let (e, _, _) = gy.dims3()?;
        let ones = Tensor::ones((e, 1, self.base), gy.dtype(), gy.device())?;
        let gb = ones.matmul(&gy.narrow(1, 0, self.base)?)?;
        Ok((Some(gy), Some(gb)))
    }
}

struct SiluTangentBwd(SiluTangent);

impl CustomOp3 for SiluTangentBwd {
    fn name(&self) -> &'static str {
        "silu-tangent-bwd"
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
        let (e, rows, o) = dims3(l1)?;
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(self.0.bwd::<f32>(
                contiguous(s1, l1)?,
                contiguous(s2, l2)?,
                contiguous(s3, l3)?,
                e,
                rows,
                o,
            )?),
            CpuStorage::F64(_) => CpuStorage::F64(self.0.bwd::<f64>(
                contiguous(s1, l1)?,
                contiguous(s2, l2)?,
                contiguous(s3, l3)?,
                e,
                rows,
                o,
            )?),
            _ => candle_core::bail!("silu-tangent-bwd: f32 or f64 inputs only"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// `x W` for a constant `W` (a frozen view's weights): the same product as
/// `Tensor::matmul`, but the backward pass returns only `d loss / d x`. candle's own
/// matmul backward always forms the gradient of both operands, here the unused
/// `x^T g`, as costly as the product itself.
pub(crate) struct ConstWeightMatmul;

impl CustomOp2 for ConstWeightMatmul {
    fn name(&self) -> &'static str {
        "const-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (e, m, k) = dims3(l1)?;
        let (e2, k2, n) = dims3(l2)?;
        if e != e2 || k != k2 {
            candle_core::bail!("const-weight-matmul: {:?} times {:?}", l1.dims(), l2.dims())
        }
        let out = s1.matmul(s2, (e, m, n, k), l1, l2)?;
        Ok((out, Shape::from((e, m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.matmul(&w.t()?)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

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
}
