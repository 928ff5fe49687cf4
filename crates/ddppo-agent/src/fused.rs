//! Single-pass CPU kernels for the SAC networks' per-step updates, each
//! computing exactly what the candle ops it replaces compute, bit for bit
//! (the tests compare them), without their intermediate tensors:
//!
//! - [`linear`]: `x w^T`, its three products (forward, input and weight
//!   gradients) split over the helper threads of `ddppo_models::split`, each
//!   element computed as candle's unsplit matmul computes it; and no gradient
//!   for data inputs and frozen weights, which candle's matmul forms anyway.
//! - [`dense`]: a network layer, `x w^T + b` and its ReLU, as one graph node.
//!   candle's version is four nodes (product, broadcast, add, ReLU): each
//!   node's gradient starts as a zero-filled buffer that the gradient is added
//!   to, its broadcast sums the bias gradient with a generic strided reduction
//!   (a division per element), and its ReLU gradient takes five passes
//!   (comparison, cast, product, zeros, sum). Here the layer's backward pass
//!   forms the ReLU's gradient in one pass, as candle's values, the bias
//!   gradient as one pass of column sums in candle's order (row 0 first, from
//!   0), and [`linear`]'s products.
//! - [`AdamUpdate`] and [`PolyakUpdate`]: the optimiser step and the target
//!   networks' averaging of [`crate::nn`], in place, with the same f32 (or
//!   f64) operations in the same order as the tensor-op version (an `affine`
//!   is `x * mul + add` with both cast from f64, `add` 0 included, since
//!   `-0 + 0` is `+0`).
//!
//! Other devices keep the tensor ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, InplaceOp2, InplaceOp3, Layout, Shape, Tensor, WithDType};

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
    /// candle's ReLU of one value: `max(v, 0)`.
    fn relu(self) -> Self;
}
impl Real for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn relu(self) -> Self {
        self.max(0f32)
    }
}
impl Real for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn relu(self) -> Self {
        self.max(0f64)
    }
}

/// candle's `affine(mul, add)` of one value: `x * mul + add`, both cast from f64.
#[inline(always)]
fn affine<T: Real>(x: T, mul: f64, add: f64) -> T {
    x * T::from_f64(mul) + T::from_f64(add)
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

/// The thread count of [`linear`] in the networks of [`crate::nn::Mlp`]:
/// `DDPPO_MODEL_THREADS` (`ddppo_models::model_threads`, default the
/// machine's cores), read once.
pub(crate) fn split_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| ddppo_models::model_threads().unwrap_or(1))
}

/// The threads two independent computations on `t`'s device, of `work`
/// multiply-adds each, may use (`ddppo_models::split::join`): [`split_threads`]
/// on the CPU when the work is at least a split product's
/// (`ddppo_models::split::MIN_SPLIT_WORK`), else one: a small job costs less
/// than handing it over, and on a busy machine a helper may wait for a core.
/// A GPU's work stays on the thread that queues it.
pub(crate) fn join_threads(t: &Tensor, work: usize) -> usize {
    if t.device().is_cpu() && work >= ddppo_models::split::MIN_SPLIT_WORK { split_threads() } else { 1 }
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

/// candle's matmul backward of `x . w.t()` for the output gradient `g`
/// (`rows x o`): `g . w` for `x` when `w`'s data is given, and `x.t() . g`
/// (`in x out`, row-major) for `w.t()`, which reaches `w` transposed, when
/// `x`'s data is given; each product split over `threads`.
fn linear_grads<T: WithDType>(
    (rows, i, o): (usize, usize, usize),
    g: (&[T], (usize, usize)),
    w: Option<(&[T], (usize, usize))>,
    x: Option<(&[T], (usize, usize))>,
    threads: usize,
    dev: &candle_core::Device,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let dx = match w {
        Some(w) => Some(Tensor::from_vec(product((rows, i, o), g, w, threads)?, (rows, i), dev)?),
        None => None,
    };
    let dw = match x {
        Some((xd, (cs, rs))) => {
            Some(Tensor::from_vec(product((i, o, rows), (xd, (rs, cs)), g, threads)?, (i, o), dev)?.t()?)
        }
        None => None,
    };
    Ok((dx, dw))
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
        macro_rules! grads {
            ($t:ty) => {{
                let wd = if x.track_op() { Some(operand::<$t>(wc, wl)?) } else { None };
                let xd = if w.track_op() { Some(operand::<$t>(xc, xl)?) } else { None };
                linear_grads((rows, i, o), operand::<$t>(gc, gl)?, wd, xd, self.threads, &dev)?
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

/// `relu(x w^T + b)` (`relu`) or `x w^T + b`, for `x`: rows x in, `w`: out x
/// in and `b`: out, what candle's `x.matmul(&w.t())`, `broadcast_add` and
/// `relu` compute, bit for bit, forward and backward; on the CPU one graph
/// node (module documentation), the pre-activation kept inside it for the
/// ReLU's gradient. Other devices: candle's ops.
pub fn dense(x: &Tensor, w: &Tensor, b: &Tensor, relu: bool, threads: usize) -> Result<Tensor> {
    let ok = x.device().is_cpu()
        && x.rank() == 2
        && w.rank() == 2
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64);
    if ok {
        return Ok(x.apply_op3(w, b, Dense { relu, threads, pre: std::sync::Mutex::new(None) })?);
    }
    let y = x.matmul(&w.t()?)?.broadcast_add(b)?;
    Ok(if relu { y.relu()? } else { y })
}

struct Dense {
    relu: bool,
    threads: usize,
    /// `x w^T + b` of the forward pass (kept when `relu`).
    pre: std::sync::Mutex<Option<CpuStorage>>,
}

impl Dense {
    /// The output and, with ReLU, the pre-activation.
    fn fwd_t<T: Real>(
        &self,
        (x, xs): (&[T], (usize, usize)),
        (w, ws): (&[T], (usize, usize)),
        b: &[T],
        (rows, i, o): (usize, usize, usize),
    ) -> candle_core::Result<(Vec<T>, Option<Vec<T>>)> {
        if b.len() != o {
            candle_core::bail!("dense: a bias of {} for {o} outputs", b.len())
        }
        let mut y = product((rows, o, i), (x, xs), (w, (ws.1, ws.0)), self.threads)?;
        for row in y.chunks_exact_mut(o.max(1)) {
            row.iter_mut().zip(b).for_each(|(v, &b)| *v += b);
        }
        if !self.relu {
            return Ok((y, None));
        }
        let pre = y.clone();
        y.iter_mut().for_each(|v| *v = v.relu());
        Ok((y, Some(pre)))
    }

    /// The gradient reaching the product's output, as candle forms it from
    /// the output's gradient `g`: through the ReLU (`g * (pre >= 0 ? 1 : 0)`)
    /// and then added to a zero start, the product's own gradient buffer.
    fn pre_grad<T: Real>(&self, g: &[T], pre: Option<&[T]>) -> Vec<T> {
        let zero = T::zero();
        match pre {
            Some(pre) => g.iter().zip(pre).map(|(&g, &p)| zero + g * if p >= zero { T::one() } else { zero }).collect(),
            None => g.iter().map(|&g| zero + g).collect(),
        }
    }
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        "dense"
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
        let dims = linear_dims(l1, l2)?;
        let (y, pre) = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (y, pre) = self.fwd_t::<f32>(operand(s1, l1)?, operand(s2, l2)?, slice(s3, l3, "bias")?, dims)?;
                (CpuStorage::F32(y), pre.map(CpuStorage::F32))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (y, pre) = self.fwd_t::<f64>(operand(s1, l1)?, operand(s2, l2)?, slice(s3, l3, "bias")?, dims)?;
                (CpuStorage::F64(y), pre.map(CpuStorage::F64))
            }
            _ => candle_core::bail!("dense: f32 or f64 tensors of one dtype"),
        };
        *self.pre.lock().map_err(|_| candle_core::Error::Msg("dense: lock poisoned".into()))? = pre;
        Ok((y, Shape::from((dims.0, dims.2))))
    }

    /// [`Linear`]'s products on the gradient [`Dense::pre_grad`] forms, and
    /// the bias gradient as candle's broadcast sums it ([`column_sums`]).
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, i) = x.dims2()?;
        let o = w.dim(0)?;
        let dev = x.device().clone();
        let gc = g.contiguous()?;
        let (gs, gl) = gc.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let pre = self.pre.lock().map_err(|_| candle_core::Error::Msg("dense: lock poisoned".into()))?;
        let (candle_core::Storage::Cpu(gc), candle_core::Storage::Cpu(xc), candle_core::Storage::Cpu(wc)) =
            (&*gs, &*xs, &*ws)
        else {
            candle_core::bail!("dense: CPU tensors only")
        };
        if self.relu && pre.is_none() {
            candle_core::bail!("dense: backward pass before the forward pass")
        }
        macro_rules! grads {
            ($t:ty) => {{
                let p = match pre.as_ref() {
                    Some(p) => Some(p.as_slice::<$t>()?),
                    None => None,
                };
                let gy = self.pre_grad::<$t>(slice(gc, gl, "gradient")?, p);
                if gy.len() != rows * o {
                    candle_core::bail!("dense: gradient of {} values for {rows} x {o}", gy.len())
                }
                let wd = if x.track_op() { Some(operand::<$t>(wc, wl)?) } else { None };
                let xd = if w.track_op() { Some(operand::<$t>(xc, xl)?) } else { None };
                let (dx, dw) = linear_grads((rows, i, o), (&gy, (1, o)), wd, xd, self.threads, &dev)?;
                let db = match b.track_op() {
                    true => Some(Tensor::from_vec(column_sums::<$t>(&gy, o), o, &dev)?),
                    false => None,
                };
                (dx, dw, db)
            }};
        }
        let grads = match (gc, xc, wc) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => grads!(f32),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => grads!(f64),
            _ => candle_core::bail!("dense: f32 or f64 tensors of one dtype"),
        };
        Ok(grads)
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

    /// `dense(x, w, b, relu)` and candle's `x.matmul(&w.t())`, `broadcast_add`
    /// and `relu`: the same output and the same gradients of `x`, `w` and `b`,
    /// bit for bit, at the SAC networks' shapes, with and without the ReLU, f32
    /// and f64, 1 to 3 threads. Rows of zeros in `x` meet zero biases, so some
    /// pre-activations are exactly 0 (where candle's ReLU passes the gradient),
    /// and the loss's gradient at 0 is a weight of either sign. A frozen layer
    /// (detached `w`, `b`) and a data `x` get no gradient.
    #[test]
    fn dense_equals_candles_layer_bit_for_bit() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        for dtype in [DType::F32, DType::F64] {
            for (rows, i, o) in [(256, 35, 256), (256, 256, 256), (256, 256, 1), (64, 27, 16), (5, 3, 2)] {
                let mut xv: Vec<f64> = (0..rows * i).map(|_| rng.random_range(-1.0..1.0)).collect();
                for r in (0..rows).step_by(4) {
                    xv[r * i..(r + 1) * i].fill(0.0);
                }
                let x =
                    Var::from_tensor(&Tensor::from_vec(xv, (rows, i), &Device::Cpu).unwrap().to_dtype(dtype).unwrap())
                        .unwrap();
                let w = Var::from_tensor(&random(&mut rng, &[o, i], dtype)).unwrap();
                let bv: Vec<f64> = (0..o).map(|j| if j % 3 == 0 { 0.0 } else { rng.random_range(-1.0..1.0) }).collect();
                let b = Var::from_tensor(&Tensor::new(bv, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()).unwrap();
                let cv: Vec<f64> = (0..rows * o).map(|_| rng.random_range(-1.0..1.0)).collect();
                let c = Tensor::from_vec(cv, (rows, o), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                for relu in [true, false] {
                    let run = |threads: Option<usize>| {
                        let y = match threads {
                            Some(t) => dense(x.as_tensor(), w.as_tensor(), b.as_tensor(), relu, t).unwrap(),
                            None => {
                                let y = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
                                let y = y.broadcast_add(b.as_tensor()).unwrap();
                                if relu { y.relu().unwrap() } else { y }
                            }
                        };
                        let loss = ((y.sin().unwrap() * &c).unwrap().sum_all().unwrap()
                            - y.sqr().unwrap().mean_all().unwrap())
                        .unwrap();
                        let g = loss.backward().unwrap();
                        [&y, x.as_tensor(), w.as_tensor(), b.as_tensor()]
                            .map(|t| bits(if std::ptr::eq(t, &y) { t } else { g.get(t).unwrap() }))
                    };
                    let expect = run(None);
                    for t in 1..=3 {
                        assert!(run(Some(t)) == expect, "{dtype:?} {rows}x{i}->{o} relu {relu}, {t} threads");
                    }
                    let frozen =
                        dense(x.as_tensor(), &w.as_tensor().detach(), &b.as_tensor().detach(), relu, 2).unwrap();
                    let g = frozen.sum_all().unwrap().backward().unwrap();
                    assert!(
                        g.get(x.as_tensor()).is_some()
                            && g.get(w.as_tensor()).is_none()
                            && g.get(b.as_tensor()).is_none()
                    );
                    let data = dense(&x.as_tensor().detach(), w.as_tensor(), b.as_tensor(), relu, 2).unwrap();
                    let g = data.sum_all().unwrap().backward().unwrap();
                    assert!(
                        g.get(x.as_tensor()).is_none()
                            && g.get(w.as_tensor()).is_some()
                            && g.get(b.as_tensor()).is_some()
                    );
                }
            }
        }
        let zeros = |r, c| Tensor::zeros((r, c), DType::F32, &Device::Cpu).unwrap();
        let bias = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        assert!(dense(&zeros(3, 4), &zeros(5, 4), &bias, true, 2).is_err(), "a bias of 4 for 5 outputs");
        assert!(dense(&zeros(3, 4), &zeros(5, 3), &bias, true, 2).is_err(), "3 x 4 times the transpose of 5 x 3");
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
        // Small variables (one thread) and a layer's worth (spread over the helper threads).
        let small: &[&[usize]] = &[&[13, 7], &[7]];
        let large: &[&[usize]] = &[&[130, 70], &[70], &[64, 130], &[64]];
        for (dtype, clip, shapes) in [
            (DType::F32, Some(5.0), small),
            (DType::F32, None, small),
            (DType::F64, Some(0.5), small),
            (DType::F32, Some(5.0), large),
        ] {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
            let init: Vec<Tensor> = shapes.iter().map(|s| random(&mut rng, s, dtype)).collect();
            let grads: Vec<Vec<Tensor>> =
                (0..30).map(|_| shapes.iter().map(|s| random(&mut rng, s, dtype)).collect()).collect();
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
            assert_eq!(run(true), run(false), "{dtype:?}, clip {clip:?}, {} variables", shapes.len());
        }
    }

    /// The in-place Polyak average equals the tensor-op one, bit for bit.
    #[test]
    fn fused_polyak_equals_tensor_ops_bit_for_bit() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        // One small pair (one thread) and a network's worth (spread over the helper threads).
        let small: &[&[usize]] = &[&[11, 5]];
        let large: &[&[usize]] = &[&[11, 5], &[140, 90], &[90], &[3, 90]];
        for (dtype, shapes) in [(DType::F32, small), (DType::F64, small), (DType::F32, large)] {
            let t0: Vec<Tensor> = shapes.iter().map(|s| random(&mut rng, s, dtype)).collect();
            let s0: Vec<Tensor> = shapes.iter().map(|s| random(&mut rng, s, dtype)).collect();
            let target: Vec<Var> = t0.iter().map(|t| Var::from_tensor(&t.copy().unwrap()).unwrap()).collect();
            let source: Vec<Var> = s0.iter().map(|s| Var::from_tensor(s).unwrap()).collect();
            for _ in 0..20 {
                polyak(&target, &source, 0.005).unwrap();
            }
            for ((target, t0), s0) in target.iter().zip(t0).zip(&s0) {
                let mut t = t0;
                for _ in 0..20 {
                    t = ((&t * (1.0 - 0.005)).unwrap() + (s0 * 0.005).unwrap()).unwrap();
                }
                assert_eq!(bits(target.as_tensor()), bits(&t), "{dtype:?}");
            }
        }
    }
}
