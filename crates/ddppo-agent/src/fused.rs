//! Single-pass CPU kernels for the SAC networks' per-step updates, each
//! computing exactly what the candle ops it replaces compute, bit for bit
//! (the tests compare them), without their intermediate tensors:
//!
//! - [`add_bias`]: `x + b` broadcast over rows. candle's `broadcast_add`
//!   records a broadcast node whose backward pass sums the gradient over the
//!   rows with its generic strided reduction (a division per element), after
//!   accumulating the whole gradient into a zero tensor; here the bias
//!   gradient is one pass of column sums in the same order (row 0 first,
//!   from 0), and the input gradient is the output gradient itself.
//! - [`linear`]: `x w^T`, its three products (forward, input and weight
//!   gradients) split over the helper threads of `ddppo_models::split`, each
//!   element computed as candle's unsplit matmul computes it; and no gradient
//!   for data inputs and frozen weights, which candle's matmul forms anyway.
//! - [`AdamUpdate`] and [`PolyakUpdate`]: the optimiser step and the target
//!   networks' averaging of [`crate::nn`], in place, with the same f32 (or
//!   f64) operations in the same order as the tensor-op version (an `affine`
//!   is `x * mul + add` with both cast from f64, `add` 0 included, since
//!   `-0 + 0` is `+0`).
//!
//! Other devices keep the tensor ops.

use candle_core::{CpuStorage, CustomOp2, InplaceOp2, InplaceOp3, Layout, Shape, Tensor, WithDType};

use crate::Result;
use ddppo_models::split::product;

/// The element range of a contiguous layout.
fn range(l: &Layout, what: &str) -> candle_core::Result<std::ops::Range<usize>> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("fused: {what} must be contiguous")))?;
    Ok(a..b)
}

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    Ok(&s.as_slice::<T>()?[range(l, what)?])
}

/// Element types of the kernels.
pub(crate) trait Real:
    WithDType
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + PartialOrd
{
    fn sqrt(self) -> Self;
}
impl Real for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}
impl Real for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// candle's `affine(mul, add)` of one value: `x * mul + add`, both cast from f64.
#[inline(always)]
fn affine<T: Real>(x: T, mul: f64, add: f64) -> T {
    x * T::from_f64(mul) + T::from_f64(add)
}

/// `x + b` for `x`: rows x n and `b`: n, on any device; on the CPU one
/// custom op whose backward pass is a single column-sum pass.
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64) {
        Ok(x.apply_op2(b, AddBias)?)
    } else {
        Ok(x.broadcast_add(b)?)
    }
}

struct AddBias;

fn bias_dims(l1: &Layout, l2: &Layout) -> candle_core::Result<(usize, usize)> {
    match (l1.dims(), l2.dims()) {
        ([rows, n], [m]) if n == m => Ok((*rows, *n)),
        (a, b) => candle_core::bail!("add-bias: {a:?} plus {b:?}"),
    }
}

fn add_rows<T: Real>(x: &[T], b: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(b.len()) {
        out.extend(row.iter().zip(b).map(|(&x, &b)| x + b));
    }
    out
}

/// Column sums, row 0 first, each from 0: candle's sum over dim 0.
fn column_sums<T: Real>(g: &[T], n: usize) -> Vec<T> {
    let mut out = vec![T::zero(); n];
    for row in g.chunks_exact(n) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
    out
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        bias_dims(l1, l2)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(add_rows::<f32>(slice(s1, l1, "input")?, slice(s2, l2, "bias")?))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(add_rows::<f64>(slice(s1, l1, "input")?, slice(s2, l2, "bias")?))
            }
            _ => candle_core::bail!("add-bias: f32 or f64 tensors of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !b.track_op() {
            return Ok((Some(g.clone()), None));
        }
        let gc = g.contiguous()?;
        let n = b.elem_count();
        let (s, l) = gc.storage_and_layout();
        let sums = match &*s {
            candle_core::Storage::Cpu(c @ CpuStorage::F32(_)) => {
                Tensor::from_vec(column_sums::<f32>(slice(c, l, "gradient")?, n), n, b.device())?
            }
            candle_core::Storage::Cpu(c @ CpuStorage::F64(_)) => {
                Tensor::from_vec(column_sums::<f64>(slice(c, l, "gradient")?, n), n, b.device())?
            }
            _ => candle_core::bail!("add-bias: f32 or f64 CPU gradient"),
        };
        Ok((Some(g.clone()), Some(sums)))
    }
}

/// The thread count of [`linear`] in the networks of [`crate::nn::Mlp`]:
/// `DDPPO_MODEL_THREADS` (`ddppo_models::model_threads`, default the
/// machine's cores), read once.
pub(crate) fn split_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| ddppo_models::model_threads().unwrap_or(1))
}

/// `x w^T` for `x`: rows x in and `w`: out x in, what `x.matmul(&w.t())`
/// computes, bit for bit, forward and backward; on the CPU one custom op
/// whose three products (`x w^T`, `g w`, `x^T g`) are each split over up to
/// `threads` threads (`ddppo_models::split`, the unsplit product's numbers)
/// and which forms only the gradients that are used (none for `x` when it is
/// data, none for `w` when it is frozen).
pub fn linear(x: &Tensor, w: &Tensor, threads: usize) -> Result<Tensor> {
    let ok = x.device().is_cpu()
        && x.rank() == 2
        && w.rank() == 2
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64);
    if ok { Ok(x.apply_op2(w, Linear { threads })?) } else { Ok(x.matmul(&w.t()?)?) }
}

struct Linear {
    threads: usize,
}

/// One operand's element data from its offset on, and its (column, row) strides.
fn operand<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [T], (usize, usize))> {
    let st = l.stride();
    Ok((&s.as_slice::<T>()?[l.start_offset()..], (st[1], st[0])))
}

fn linear_dims(l1: &Layout, l2: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    match (l1.dims(), l2.dims()) {
        ([rows, i], [o, j]) if i == j => Ok((*rows, *i, *o)),
        (a, b) => candle_core::bail!("linear: {a:?} times the transpose of {b:?}"),
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, i, o) = linear_dims(l1, l2)?;
        // `w^T` is `w`'s layout with the strides swapped, as candle's `t()`.
        let transposed = |(cs, rs): (usize, usize)| (rs, cs);
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let ((x, xs), (w, ws)) = (operand::<f32>(s1, l1)?, operand::<f32>(s2, l2)?);
                CpuStorage::F32(product((rows, o, i), (x, xs), (w, transposed(ws)), self.threads)?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let ((x, xs), (w, ws)) = (operand::<f64>(s1, l1)?, operand::<f64>(s2, l2)?);
                CpuStorage::F64(product((rows, o, i), (x, xs), (w, transposed(ws)), self.threads)?)
            }
            _ => candle_core::bail!("linear: f32 or f64 tensors of one dtype"),
        };
        Ok((out, Shape::from((rows, o))))
    }

    /// candle's matmul backward of `x . w.t()`: `g . w` for `x` and `x.t() . g`
    /// (`in x out`, row-major) for `w.t()`, which reaches `w` transposed.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, i) = x.dims2()?;
        let o = w.dim(0)?;
        let dev = x.device().clone();
        let (gs, gl) = g.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (candle_core::Storage::Cpu(gc), candle_core::Storage::Cpu(xc), candle_core::Storage::Cpu(wc)) =
            (&*gs, &*xs, &*ws)
        else {
            candle_core::bail!("linear: CPU tensors only")
        };
        let transposed = |(cs, rs): (usize, usize)| (rs, cs);
        macro_rules! grads {
            ($t:ty) => {{
                let (gd, gst) = operand::<$t>(gc, gl)?;
                let dx = match x.track_op() {
                    true => {
                        let (wd, wst) = operand::<$t>(wc, wl)?;
                        let v = product((rows, i, o), (gd, gst), (wd, wst), self.threads)?;
                        Some(Tensor::from_vec(v, (rows, i), &dev)?)
                    }
                    false => None,
                };
                let dw = match w.track_op() {
                    true => {
                        let (xd, xst) = operand::<$t>(xc, xl)?;
                        let v = product((i, o, rows), (xd, transposed(xst)), (gd, gst), self.threads)?;
                        Some(Tensor::from_vec(v, (i, o), &dev)?.t()?)
                    }
                    false => None,
                };
                (dx, dw)
            }};
        }
        let (dx, dw) = match (gc, xc, wc) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => grads!(f32),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => grads!(f64),
            _ => candle_core::bail!("linear: f32 or f64 tensors of one dtype"),
        };
        Ok((dx, dw))
    }
}

/// One Adam step of [`crate::nn::Adam`]: the new moments from the old ones
/// and the gradient, then the parameter, in place.
pub(crate) struct AdamUpdate {
    pub clip: Option<f64>,
    pub beta1: f64,
    pub beta2: f64,
    pub bc1: f64,
    pub bc2: f64,
    pub eps: f64,
    pub lr: f64,
}

impl AdamUpdate {
    /// `m' = m b1 + clip(g) (1 - b1)`, `v' = v b2 + clip(g)^2 (1 - b2)`, each
    /// operation as the tensor ops order and round it.
    fn moments<T: Real>(&self, m: &[T], v: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
        let clip = self.clip.map(|c| (T::from_f64(-c), T::from_f64(c)));
        let mut m_new = Vec::with_capacity(m.len());
        let mut v_new = Vec::with_capacity(v.len());
        for ((&m, &v), &g) in m.iter().zip(v).zip(g) {
            let g = match clip {
                // `maximum(lo)` then `minimum(hi)`, candle's comparisons.
                Some((lo, hi)) => {
                    let g = if g < lo { lo } else { g };
                    if g > hi { hi } else { g }
                }
                None => g,
            };
            m_new.push(affine(m, self.beta1, 0.0) + affine(g, 1.0 - self.beta1, 0.0));
            v_new.push(affine(v, self.beta2, 0.0) + affine(g * g, 1.0 - self.beta2, 0.0));
        }
        (m_new, v_new)
    }

    /// `p <- p - lr (m' / bc1) / (sqrt(v' / bc2) + eps)`.
    fn step<T: Real>(&self, p: &mut [T], m: &[T], v: &[T]) {
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            let denom = affine(affine(v, 1.0 / self.bc2, 0.0).sqrt(), 1.0, self.eps);
            let update = affine(m, 1.0 / self.bc1, 0.0) / denom;
            *p -= affine(update, self.lr, 0.0);
        }
    }

    /// Steps the CPU parameter `p` in place with gradient `g`; returns the new
    /// moments.
    pub(crate) fn apply(&self, p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
        let shape = p.shape().clone();
        if m.shape() != &shape || v.shape() != &shape || g.shape() != &shape {
            return Err(crate::Error::Shape("adam: parameter, moments and gradient differ in shape".into()));
        }
        let (m, v, g) = (m.contiguous()?, v.contiguous()?, g.contiguous()?);
        let (new_m, new_v) = {
            let ((ms, ml), (vs, vl), (gs, gl)) =
                (m.storage_and_layout(), v.storage_and_layout(), g.storage_and_layout());
            let dev = p.device();
            match (&*ms, &*vs, &*gs) {
                (
                    candle_core::Storage::Cpu(m @ CpuStorage::F32(_)),
                    candle_core::Storage::Cpu(v @ CpuStorage::F32(_)),
                    candle_core::Storage::Cpu(g @ CpuStorage::F32(_)),
                ) => {
                    let (a, b) = self.moments::<f32>(
                        slice(m, ml, "moment")?,
                        slice(v, vl, "moment")?,
                        slice(g, gl, "gradient")?,
                    );
                    (Tensor::from_vec(a, &shape, dev)?, Tensor::from_vec(b, &shape, dev)?)
                }
                (
                    candle_core::Storage::Cpu(m @ CpuStorage::F64(_)),
                    candle_core::Storage::Cpu(v @ CpuStorage::F64(_)),
                    candle_core::Storage::Cpu(g @ CpuStorage::F64(_)),
                ) => {
                    let (a, b) = self.moments::<f64>(
                        slice(m, ml, "moment")?,
                        slice(v, vl, "moment")?,
                        slice(g, gl, "gradient")?,
                    );
                    (Tensor::from_vec(a, &shape, dev)?, Tensor::from_vec(b, &shape, dev)?)
                }
                _ => return Err(crate::Error::Shape("adam: f32 or f64 CPU tensors of one dtype".into())),
            }
        };
        p.inplace_op3(&new_m, &new_v, self)?;
        Ok((new_m, new_v))
    }
}

impl InplaceOp3 for AdamUpdate {
    fn name(&self) -> &'static str {
        "sac-adam"
    }
    fn cpu_fwd(
        &self,
        p: &mut CpuStorage,
        pl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        let r = range(pl, "parameter")?;
        match p {
            CpuStorage::F32(p) => self.step::<f32>(&mut p[r], slice(m, ml, "moment")?, slice(v, vl, "moment")?),
            CpuStorage::F64(p) => self.step::<f64>(&mut p[r], slice(m, ml, "moment")?, slice(v, vl, "moment")?),
            _ => candle_core::bail!("sac-adam: f32 or f64 parameters"),
        }
        Ok(())
    }
}

/// `target <- target (1 - tau) + source tau`, in place.
pub(crate) struct PolyakUpdate(pub f64);

impl PolyakUpdate {
    fn run<T: Real>(&self, t: &mut [T], s: &[T]) {
        for (t, &s) in t.iter_mut().zip(s) {
            *t = affine(*t, 1.0 - self.0, 0.0) + affine(s, self.0, 0.0);
        }
    }
}

impl InplaceOp2 for PolyakUpdate {
    fn name(&self) -> &'static str {
        "polyak"
    }
    fn cpu_fwd(&self, t: &mut CpuStorage, tl: &Layout, s: &CpuStorage, sl: &Layout) -> candle_core::Result<()> {
        if tl.shape() != sl.shape() {
            candle_core::bail!("polyak: target {:?} and source {:?}", tl.dims(), sl.dims())
        }
        let r = range(tl, "target")?;
        match (t, s) {
            (CpuStorage::F32(t), CpuStorage::F32(_)) => self.run::<f32>(&mut t[r], slice(s, sl, "source")?),
            (CpuStorage::F64(t), CpuStorage::F64(_)) => self.run::<f64>(&mut t[r], slice(s, sl, "source")?),
            _ => candle_core::bail!("polyak: f32 or f64 tensors of one dtype"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Adam, polyak};
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};

    fn random(rng: &mut rand_chacha::ChaCha8Rng, shape: &[usize], dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        // Signed zeros and values across the clip bounds on purpose.
        let v: Vec<f64> = (0..n)
            .map(|i| match i % 17 {
                0 => -0.0,
                1 => 0.0,
                _ => rng.random_range(-8.0..8.0),
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    fn bits(t: &Tensor) -> Vec<u64> {
        let t = t.flatten_all().unwrap();
        match t.dtype() {
            DType::F32 => t.to_vec1::<f32>().unwrap().into_iter().map(|v| v.to_bits() as u64).collect(),
            _ => t.to_vec1::<f64>().unwrap().into_iter().map(f64::to_bits).collect(),
        }
    }

    /// `add_bias` and candle's `broadcast_add`: the same output and, through
    /// a nonlinear loss that uses the result twice, the same gradients of
    /// the input and of the bias, bit for bit, in f32 and f64; a detached
    /// bias gets none.
    #[test]
    fn add_bias_equals_broadcast_add_bit_for_bit() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&random(&mut rng, &[37, 19], dtype)).unwrap();
            let b = Var::from_tensor(&random(&mut rng, &[19], dtype)).unwrap();
            let run = |fused: bool| {
                let y = if fused {
                    add_bias(x.as_tensor(), b.as_tensor()).unwrap()
                } else {
                    x.as_tensor().broadcast_add(b.as_tensor()).unwrap()
                };
                let loss = ((y.tanh().unwrap() * &y).unwrap().sum_all().unwrap()
                    + y.sqr().unwrap().mean_all().unwrap())
                .unwrap();
                let g = loss.backward().unwrap();
                [y, g.get(x.as_tensor()).unwrap().clone(), g.get(b.as_tensor()).unwrap().clone()].map(|t| bits(&t))
            };
            assert_eq!(run(true), run(false), "{dtype:?}");
            let y = add_bias(x.as_tensor(), &b.as_tensor().detach()).unwrap();
            let g = y.sum_all().unwrap().backward().unwrap();
            assert!(g.get(x.as_tensor()).is_some() && g.get(b.as_tensor()).is_none());
        }
        let bad = add_bias(
            &Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap(),
            &Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(bad.is_err());
    }

    /// `linear(x, w)` and candle's `x.matmul(&w.t())`: the same output and,
    /// through a nonlinear loss, the same gradients of `x` and `w`, bit for
    /// bit, at the SAC networks' shapes (a 256-row batch through 27 -> 256 ->
    /// 256 -> 16 and a Q head with one output), f32 and f64, 1 to 3 threads;
    /// a frozen `w` and a data `x` get no gradient.
    #[test]
    fn linear_equals_matmul_of_transpose_bit_for_bit() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        for dtype in [DType::F32, DType::F64] {
            for (rows, i, o) in
                [(256, 27, 256), (256, 256, 256), (256, 256, 16), (256, 256, 1), (5, 3, 2), (51, 35, 200)]
            {
                let x = Var::from_tensor(&random(&mut rng, &[rows, i], dtype)).unwrap();
                let w = Var::from_tensor(&random(&mut rng, &[o, i], dtype)).unwrap();
                let run = |threads: Option<usize>| {
                    let y = match threads {
                        Some(t) => linear(x.as_tensor(), w.as_tensor(), t).unwrap(),
                        None => x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap(),
                    };
                    let loss = ((y.tanh().unwrap() * &y).unwrap().sum_all().unwrap()
                        + y.sqr().unwrap().mean_all().unwrap())
                    .unwrap();
                    let g = loss.backward().unwrap();
                    [y, g.get(x.as_tensor()).unwrap().clone(), g.get(w.as_tensor()).unwrap().clone()].map(|t| bits(&t))
                };
                let expect = run(None);
                for t in 1..=3 {
                    assert!(run(Some(t)) == expect, "{dtype:?} {rows}x{i}->{o}, {t} threads");
                }
                let y = linear(&x.as_tensor().detach(), &w.as_tensor().detach(), 2).unwrap();
                assert!(y.sum_all().unwrap().backward().is_ok());
                let y = linear(x.as_tensor(), &w.as_tensor().detach(), 2).unwrap();
                let g = y.sum_all().unwrap().backward().unwrap();
                assert!(g.get(x.as_tensor()).is_some() && g.get(w.as_tensor()).is_none());
            }
        }
        let zeros = |r, c| Tensor::zeros((r, c), DType::F32, &Device::Cpu).unwrap();
        assert!(linear(&zeros(3, 4), &zeros(5, 3), 2).is_err());
    }

    /// The single-pass Adam step and the tensor-op step leave the same
    /// parameters and moments, bit for bit, over many steps whose gradients
    /// cross the clip bounds, with and without clipping, in f32 and f64.
    #[test]
    fn fused_adam_equals_tensor_ops_bit_for_bit() {
        for (dtype, clip) in [(DType::F32, Some(5.0)), (DType::F32, None), (DType::F64, Some(0.5))] {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
            let init = [random(&mut rng, &[13, 7], dtype), random(&mut rng, &[7], dtype)];
            let grads: Vec<Vec<Tensor>> =
                (0..30).map(|_| vec![random(&mut rng, &[13, 7], dtype), random(&mut rng, &[7], dtype)]).collect();
            let run = |fused: bool| {
                let vars: Vec<Var> = init.iter().map(|t| Var::from_tensor(&t.copy().unwrap()).unwrap()).collect();
                let mut adam = Adam::new(vars.clone(), 3e-4, clip).unwrap();
                adam.set_fused(fused);
                for g in &grads {
                    adam.step_with(|v| {
                        vars.iter().position(|w| w.as_tensor().id() == v.as_tensor().id()).map(|i| g[i].clone())
                    })
                    .unwrap();
                }
                let (m, v) = adam.moments();
                vars.iter().map(|v| bits(v.as_tensor())).chain(m.iter().chain(v).map(bits)).collect::<Vec<_>>()
            };
            assert_eq!(run(true), run(false), "{dtype:?}, clip {clip:?}");
        }
    }

    /// The in-place Polyak average equals the tensor-op one, bit for bit.
    #[test]
    fn fused_polyak_equals_tensor_ops_bit_for_bit() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        for dtype in [DType::F32, DType::F64] {
            let (t0, s0) = (random(&mut rng, &[11, 5], dtype), random(&mut rng, &[11, 5], dtype));
            let target = Var::from_tensor(&t0.copy().unwrap()).unwrap();
            let source = Var::from_tensor(&s0).unwrap();
            for _ in 0..20 {
                polyak(std::slice::from_ref(&target), std::slice::from_ref(&source), 0.005).unwrap();
            }
            let mut t = t0;
            for _ in 0..20 {
                t = ((&t * (1.0 - 0.005)).unwrap() + (&s0 * 0.005).unwrap()).unwrap();
            }
            assert_eq!(bits(target.as_tensor()), bits(&t), "{dtype:?}");
        }
    }
}
