//! Adam for the ensembles (ALGORITHM.md section 2: Adam, lr 1e-3), with state that
//! can be read and restored, so a training run can be checkpointed and resumed
//! bit for bit (candle's `AdamW` keeps its moments private).
//!
//! The update is PyTorch's `torch.optim.Adam` (betas 0.9/0.999, eps 1e-8, no weight
//! decay: the L2 terms are in the loss):
//!
//! ```text
//! m = lerp(m, g, 1 - b1)                  v = b2 v + (1 - b2) g^2
//! p -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//!
//! On CPU each parameter is updated by three fused passes (no temporaries); elsewhere
//! by ordinary tensor ops. The moments are replaced by fresh tensors every step, never
//! written in place, so a read [`OptimizerState`] is a snapshot.
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp2, InplaceOp3, Layout, Shape, Tensor, Var};

use crate::ensemble::ProbabilisticEnsemble;
use crate::{Error, Result};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// Adam's state: the step count and the first and second moments of every
/// parameter, in the order of the ensemble's parameter list (per layer weight then
/// bias, then `max_logvar`, `min_logvar`), each the parameter's shape.
#[derive(Clone, Debug)]
pub struct OptimizerState {
    /// Updates taken so far (the `t` of the bias corrections).
    pub step: u64,
    /// First moments.
    pub m: Vec<Tensor>,
    /// Second moments.
    pub v: Vec<Tensor>,
}

/// Adam over an ensemble's parameters. One training step = loss, backward, update.
pub struct ModelOptimizer {
    vars: Vec<Var>,
    lr: f64,
    step: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    fused: bool,
}

impl ModelOptimizer {
    /// Zero moments, step 0, the ensemble's learning rate.
    pub fn new(ens: &ProbabilisticEnsemble) -> Result<Self> {
        let vars = ens.vars();
        let mut m = Vec::with_capacity(vars.len());
        for var in &vars {
            m.push(var.as_tensor().zeros_like()?);
        }
        let v = m.clone();
        Ok(Self { fused: ens.device().is_cpu(), vars, lr: ens.cfg.lr, step: 0, m, v })
    }

    /// An optimiser for `ens` continuing from `state`; the moments must match the
    /// ensemble's parameters in number and shape (else an [`Error::OptimizerState`]).
    pub fn from_state(ens: &ProbabilisticEnsemble, state: &OptimizerState) -> Result<Self> {
        let mut opt = Self::new(ens)?;
        let bad = |s: String| Error::OptimizerState(s);
        let n = opt.vars.len();
        if state.m.len() != n || state.v.len() != n {
            return Err(bad(format!(
                "{} first and {} second moments for a model with {n} parameter tensors",
                state.m.len(),
                state.v.len()
            )));
        }
        for (i, var) in opt.vars.iter().enumerate() {
            for (what, t) in [("first", &state.m[i]), ("second", &state.v[i])] {
                if t.dims() != var.dims() {
                    return Err(bad(format!(
                        "{what} moment {i} has shape {:?}, the model's parameter {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
            }
        }
        let own = |t: &Tensor| -> Result<Tensor> {
            // A private contiguous copy in the model's dtype and device.
            Ok(t.to_dtype(ens.dtype())?.to_device(ens.device())?.contiguous()?.copy()?)
        };
        opt.m = state.m.iter().map(own).collect::<Result<_>>()?;
        opt.v = state.v.iter().map(own).collect::<Result<_>>()?;
        opt.step = state.step;
        Ok(opt)
    }

    /// The current state (cheap: the moment tensors are immutable once made).
    pub fn state(&self) -> OptimizerState {
        OptimizerState { step: self.step, m: self.m.clone(), v: self.v.clone() }
    }

    /// Back-propagates `total` and updates the parameters; returns the loss value.
    pub fn apply(&mut self, total: &Tensor) -> Result<f64> {
        let value = crate::transfer::download_scalar(total)?;
        self.backward_step(total)?;
        Ok(value)
    }

    /// [`apply`](Self::apply) without reading the loss back to the host.
    pub(crate) fn backward_step(&mut self, total: &Tensor) -> Result<()> {
        self.backward_step_taped(total, None)
    }

    /// [`backward_step`](Self::backward_step) for a total formed by
    /// [`training_loss`](ProbabilisticEnsemble::training_loss), with its tape.
    pub(crate) fn backward_step_taped(&mut self, total: &Tensor, tape: Option<crate::fused::Tape>) -> Result<()> {
        let mut grads = total.backward()?;
        if let Some(tape) = tape {
            tape.backward(&mut grads)?;
        }
        self.update(&grads)
    }

    /// One step on `batch`, `weight` being `w` of equation 10; returns the loss value.
    pub fn step(&mut self, ens: &ProbabilisticEnsemble, batch: &crate::LossBatch, weight: f64) -> Result<f64> {
        let (terms, tape) = ens.training_loss(batch, weight, true)?;
        let value = crate::transfer::download_scalar(&terms.total)?;
        self.backward_step_taped(&terms.total, tape)?;
        Ok(value)
    }

    /// One Adam update from the gradients in `grads`; a parameter without a gradient
    /// keeps its value and moments.
    pub fn update(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let t = self.step as f64;
        let bc1 = 1.0 - BETA1.powf(t);
        let bc2 = 1.0 - BETA2.powf(t);
        let k = AdamStep { step_size: self.lr / bc1, bc2_sqrt: bc2.sqrt() };
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // A gradient can leave the backward pass still in the graph
            // (e.g. `sqr`'s is `2 x` of the variable): moments built from it
            // by tensor ops would chain to the previous ones for ever.
            let g = g.contiguous()?.detach();
            if self.fused {
                let m = self.m[i].apply_op2_no_bwd(&g, &Moment::First)?;
                let v = self.v[i].apply_op2_no_bwd(&g, &Moment::Second)?;
                var.as_tensor().inplace_op3(&m, &v, &k)?;
                self.m[i] = m;
                self.v[i] = v;
            } else {
                let m = (&self.m[i] + ((&g - &self.m[i])? * (1.0 - BETA1))?)?;
                let v = ((&self.v[i] * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
                let denom = ((v.sqrt()? / k.bc2_sqrt)? + EPS)?;
                let p = (var.as_tensor() - ((&m / denom)? * k.step_size)?)?;
                var.set(&p)?;
                self.m[i] = m;
                self.v[i] = v;
            }
        }
        Ok(())
    }

    /// Uses the fused CPU passes (default on CPU) or plain tensor ops (test hook).
    #[doc(hidden)]
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on && self.vars.first().is_some_and(|v| v.device().is_cpu());
    }
}

fn slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("adam: {what} must be contiguous")))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// Element types of the fused passes.
trait Real:
    candle_core::WithDType
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::SubAssign
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

/// A new moment from the old one and the gradient: `First`: `m + (1 - b1) (g - m)`
/// (PyTorch's `lerp` for a weight below 1/2), `Second`: `b2 v + (1 - b2) g^2`.
#[derive(Clone, Copy)]
enum Moment {
    First,
    Second,
}

impl Moment {
    fn run<T: Real>(self, old: &[T], g: &[T]) -> Vec<T> {
        match self {
            Moment::First => {
                let w = T::from_f64(1.0 - BETA1);
                old.iter().zip(g).map(|(&m, &g)| m + w * (g - m)).collect()
            }
            Moment::Second => {
                let (b2, w) = (T::from_f64(BETA2), T::from_f64(1.0 - BETA2));
                old.iter().zip(g).map(|(&v, &g)| v * b2 + w * g * g).collect()
            }
        }
    }
}

impl CustomOp2 for Moment {
    fn name(&self) -> &'static str {
        "adam-moment"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("adam: moment {:?} and gradient {:?}", l1.dims(), l2.dims())
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(self.run::<f32>(slice(s1, l1, "moment")?, slice(s2, l2, "gradient")?))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(self.run::<f64>(slice(s1, l1, "moment")?, slice(s2, l2, "gradient")?))
            }
            _ => candle_core::bail!("adam: f32 or f64 tensors of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// `p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)`, in place.
struct AdamStep {
    step_size: f64,
    bc2_sqrt: f64,
}

impl AdamStep {
    fn run<T: Real>(&self, p: &mut [T], m: &[T], v: &[T]) {
        let (s, c, e) = (T::from_f64(self.step_size), T::from_f64(self.bc2_sqrt), T::from_f64(EPS));
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            *p -= s * (m / (v.sqrt() / c + e));
        }
    }
}

impl InplaceOp3 for AdamStep {
    fn name(&self) -> &'static str {
        "adam-step"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            candle_core::bail!("adam: parameter and moments differ in shape")
        }
        let (a, b) = l1
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("adam: parameter must be contiguous".into()))?;
        match (s1, s2, s3) {
            (CpuStorage::F32(p), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                self.run::<f32>(&mut p[a..b], slice(s2, l2, "moment")?, slice(s3, l3, "moment")?)
            }
            (CpuStorage::F64(p), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                self.run::<f64>(&mut p[a..b], slice(s2, l2, "moment")?, slice(s3, l3, "moment")?)
            }
            _ => candle_core::bail!("adam: f32 or f64 tensors of one dtype"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EnsembleConfig;
    use candle_core::{DType, Device};
    use rand::SeedableRng;

    fn ens() -> ProbabilisticEnsemble {
        let cfg = EnsembleConfig {
            ensemble_size: 2,
            elites: 1,
            hidden: 5,
            hidden_layers: 1,
            weight_decay: vec![0.0; 2],
            ..Default::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        ProbabilisticEnsemble::new(2, 1, &cfg, &Device::Cpu, DType::F64, &mut rng).unwrap()
    }

    fn flat(e: &ProbabilisticEnsemble) -> Vec<f64> {
        e.vars().iter().flat_map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap()).collect()
    }

    /// A loss whose gradient differs per element and changes with the parameters.
    fn loss(e: &ProbabilisticEnsemble) -> Tensor {
        let mut total = Tensor::new(0.0f64, &Device::Cpu).unwrap();
        for (i, v) in e.vars().iter().enumerate() {
            let t = v.as_tensor();
            let term = ((t * (0.3 + i as f64)).unwrap().sin().unwrap() + t.sqr().unwrap()).unwrap().sum_all().unwrap();
            total = (total + term).unwrap();
        }
        total
    }

    /// The first step of Adam moves every parameter by `lr * g / (|g| + eps)`
    /// (the bias corrections cancel), as in PyTorch.
    #[test]
    fn first_step_is_lr_times_sign() {
        let e = ens();
        let before = flat(&e);
        let total = loss(&e);
        let grads = total.backward().unwrap();
        let g: Vec<f64> = e
            .vars()
            .iter()
            .flat_map(|v| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap())
            .collect();
        let mut opt = ModelOptimizer::new(&e).unwrap();
        opt.update(&grads).unwrap();
        let after = flat(&e);
        for i in 0..g.len() {
            let want = before[i] - 1e-3 * g[i] / (g[i].abs() + EPS);
            assert!((after[i] - want).abs() < 1e-15, "{i}: {} vs {want}", after[i]);
        }
        assert_eq!(opt.state().step, 1);
    }

    /// The moments of the plain (CUDA) update hold values only: a gradient
    /// still in the graph (here `sqr`'s, `2 x` of the variable itself) must
    /// not chain each step's moments to the previous ones, which would grow
    /// memory for ever.
    #[test]
    fn plain_update_moments_hold_no_graph() {
        let e = ens();
        let mut opt = ModelOptimizer::new(&e).unwrap();
        opt.set_fused(false);
        for _ in 0..3 {
            opt.apply(&loss(&e)).unwrap();
        }
        let s = opt.state();
        assert!(s.m.iter().chain(&s.v).all(|t| !t.track_op()));
    }

    /// The fused CPU passes and the plain tensor-op update agree over several steps.
    #[test]
    fn fused_and_plain_updates_agree() {
        let (a, b) = (ens(), ens());
        let mut oa = ModelOptimizer::new(&a).unwrap();
        let mut ob = ModelOptimizer::new(&b).unwrap();
        ob.set_fused(false);
        for _ in 0..5 {
            oa.apply(&loss(&a)).unwrap();
            ob.apply(&loss(&b)).unwrap();
        }
        for (x, y) in flat(&a).iter().zip(flat(&b)) {
            assert!((x - y).abs() <= 1e-14 * (1.0 + y.abs()), "{x} vs {y}");
        }
        let (sa, sb) = (oa.state(), ob.state());
        for (x, y) in sa.m.iter().chain(&sa.v).zip(sb.m.iter().chain(&sb.v)) {
            let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f64>().unwrap() < 1e-15);
        }
    }
}
