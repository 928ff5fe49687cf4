//! The probabilistic ensemble shared by the prediction and gradient models
//! (ALGORITHM.md section 2): network, log-variance head, input scaler, elites,
//! forward-mode tangents (section 3), the rollout API and checkpoints.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::fused::{HiddenLayer, SiluTangent};
use crate::layer::{EnsembleLinear, host_tensor, named_var};
use crate::{EnsembleConfig, Error, Result};

/// One model transition for a batch of rows.
#[derive(Clone, Debug)]
pub struct ModelStep {
    /// `B`
    pub reward: Tensor,
    /// `B x obs`
    pub next_obs: Tensor,
}

/// Numerically stable `softplus(x) = log(1 + e^x) = relu(x) + log(1 + e^{-|x|})`
/// (candle has none; the naive form overflows for large `x`).
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.relu()? + tail)?)
}

/// The rows of a forward pass whose mean and log-variance are formed: all `base`
/// rows, or with tangents those before the tangents' points (`start`). The gradient
/// loss's points are only there for their tangents: their heads (the log-variance
/// bounds' chain of a dozen ops) would be computed and differentiated for nothing.
fn head_rows(base: usize, tangent: Option<(&Tensor, usize, usize)>) -> usize {
    tangent.map_or(base, |(_, start, _)| start)
}

/// Outputs of a forward pass with tangents.
pub(crate) struct TangentOutput {
    /// `E' x B x out`: mean of `(r, ds)` in raw units; with tangents only of the rows
    /// before the tangents' points (`start`), see [`head_rows`].
    pub mean: Tensor,
    /// `E' x B x out`: bounded log-variance, of the same rows as `mean`.
    pub logvar: Tensor,
    /// `E' x (Bt * k) x out`: `J_mean · t0` for each tangent row.
    pub tangent: Option<Tensor>,
    /// A training step's hidden stack, run outside the graph ([`crate::fused::Tape`]).
    pub tape: Option<crate::fused::Tape>,
}

#[derive(Serialize, Deserialize)]
struct Metadata {
    format: String,
    obs_dim: usize,
    act_dim: usize,
    config: EnsembleConfig,
}

const FORMAT: &str = "ddppo-ensemble-v1";

/// MBPO's probabilistic ensemble: `E` members of `hidden_layers x hidden` SiLU
/// MLPs predicting mean and log-variance of `(r, s' - s)` from `x = (s, a)`.
/// Parameters, scaler and elites of a [`ProbabilisticEnsemble`], copied.
#[derive(Clone)]
pub struct EnsembleSnapshot {
    params: Vec<Tensor>,
    scaler_mean: Vec<f64>,
    scaler_std: Vec<f64>,
    elites: Vec<usize>,
}

/// The rows of one model step grouped by the member that predicts them, the row
/// indices on the ensemble's device ([`ProbabilisticEnsemble::group_members`]).
#[derive(Clone, Debug)]
pub struct MemberGroups {
    rows: usize,
    /// Each used member with its rows (`None` when it is the only one used).
    groups: Vec<(usize, Option<Tensor>)>,
    /// Row `i`'s position among the concatenated groups (with more than one group).
    inverse: Option<Tensor>,
}

pub struct ProbabilisticEnsemble {
    pub(crate) obs_dim: usize,
    pub(crate) act_dim: usize,
    pub(crate) cfg: EnsembleConfig,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
    pub(crate) varmap: VarMap,
    pub(crate) layers: Vec<EnsembleLinear>,
    pub(crate) max_logvar: Var,
    pub(crate) min_logvar: Var,
    pub(crate) scaler_mean: Vec<f64>,
    pub(crate) scaler_std: Vec<f64>,
    scaler_mean_t: Tensor,
    scaler_inv_std_t: Tensor,
    pub(crate) elites: Vec<usize>,
    fused: bool,
    /// Training builds its minibatches on the device from data uploaded once
    /// (default off the CPU; see `train.rs`).
    pub(crate) device_batches: bool,
    /// A view from [`frozen`](ProbabilisticEnsemble::frozen): parameters used detached.
    frozen: bool,
    /// Threads the fused CPU kernels spread the members over (results do not depend on it).
    threads: usize,
}

impl ProbabilisticEnsemble {
    /// A freshly initialised ensemble (identity scaler, elites = the first `elites` members).
    pub fn new(
        obs_dim: usize,
        act_dim: usize,
        cfg: &EnsembleConfig,
        device: &Device,
        dtype: DType,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        cfg.validate()?;
        if obs_dim == 0 || act_dim == 0 {
            return Err(Error::Data(format!("obs_dim and act_dim must be >= 1, got {obs_dim} and {act_dim}")));
        }
        if !matches!(dtype, DType::F32 | DType::F64) {
            return Err(Error::Config { field: "dtype".into(), reason: format!("must be f32 or f64, got {dtype:?}") });
        }
        let in_dim = obs_dim + act_dim;
        let out_dim = 1 + obs_dim;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, device);
        let e = cfg.ensemble_size;
        let mut layers = Vec::with_capacity(cfg.hidden_layers + 1);
        let mut fan_in = in_dim;
        for l in 0..=cfg.hidden_layers {
            let fan_out = if l == cfg.hidden_layers { 2 * out_dim } else { cfg.hidden };
            layers.push(EnsembleLinear::new(&vb.pp(format!("layer{l}")), &varmap, e, fan_in, fan_out, rng)?);
            fan_in = fan_out;
        }
        let maxv = Tensor::full(cfg.max_logvar_init, (1, out_dim), device)?.to_dtype(dtype)?;
        let minv = Tensor::full(cfg.min_logvar_init, (1, out_dim), device)?.to_dtype(dtype)?;
        let max_logvar = named_var(&vb, &varmap, "max_logvar", &[1, out_dim], maxv)?;
        let min_logvar = named_var(&vb, &varmap, "min_logvar", &[1, out_dim], minv)?;
        let mut ens = Self {
            obs_dim,
            act_dim,
            cfg: cfg.clone(),
            device: device.clone(),
            dtype,
            varmap,
            layers,
            max_logvar,
            min_logvar,
            scaler_mean: vec![0.0; in_dim],
            scaler_std: vec![1.0; in_dim],
            scaler_mean_t: Tensor::zeros((1, in_dim), dtype, device)?,
            scaler_inv_std_t: Tensor::ones((1, in_dim), dtype, device)?,
            elites: (0..cfg.elites).collect(),
            fused: device.is_cpu(),
            device_batches: !device.is_cpu(),
            frozen: false,
            threads: crate::model_threads()?,
        };
        ens.set_scaler(vec![0.0; in_dim], vec![1.0; in_dim])?;
        Ok(ens)
    }

    pub fn obs_dim(&self) -> usize {
        self.obs_dim
    }
    pub fn act_dim(&self) -> usize {
        self.act_dim
    }
    /// `obs + act`
    pub fn in_dim(&self) -> usize {
        self.obs_dim + self.act_dim
    }
    /// `1 + obs`: reward and state delta.
    pub fn out_dim(&self) -> usize {
        1 + self.obs_dim
    }
    pub fn config(&self) -> &EnsembleConfig {
        &self.cfg
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The members chosen by holdout MSE at the last training.
    pub fn elites(&self) -> &[usize] {
        &self.elites
    }
    /// The named parameters (for inspection, gradients and optimisers).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }
    /// Input scaler `(mean, std)` fitted on the last training split.
    pub fn scaler(&self) -> (&[f64], &[f64]) {
        (&self.scaler_mean, &self.scaler_std)
    }

    /// A view of this ensemble whose parameters are constants: `mean`, `sample`, `jvp`
    /// and `jacobian` through it are differentiable in their inputs only, and a backward
    /// pass forms no gradient for any parameter (for the policy update, equation 11,
    /// which back-propagates through the gradient model into the policy alone).
    ///
    /// Cheap: the view shares the parameters' storage (no copy), so it sees later
    /// updates of the weights; the input scaler and the elites are copied, so take a
    /// fresh view after each training call (which refits the scaler). On CPU the
    /// view's matmuls skip the weight gradients that candle's matmul backward would
    /// otherwise compute and throw away.
    pub fn frozen(&self) -> ProbabilisticEnsemble {
        Self {
            obs_dim: self.obs_dim,
            act_dim: self.act_dim,
            cfg: self.cfg.clone(),
            device: self.device.clone(),
            dtype: self.dtype,
            varmap: self.varmap.clone(),
            layers: self.layers.clone(),
            max_logvar: self.max_logvar.clone(),
            min_logvar: self.min_logvar.clone(),
            scaler_mean: self.scaler_mean.clone(),
            scaler_std: self.scaler_std.clone(),
            scaler_mean_t: self.scaler_mean_t.clone(),
            scaler_inv_std_t: self.scaler_inv_std_t.clone(),
            elites: self.elites.clone(),
            fused: self.fused,
            device_batches: self.device_batches,
            frozen: true,
            threads: self.threads,
        }
    }

    /// Spreads the members over `threads` threads (at least 1) in the CPU kernels of
    /// every forward and backward pass, training included. Each member is computed by
    /// the same code whichever thread runs it, so the numbers are the same for any
    /// count. The default is [`model_threads`](crate::model_threads).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// The thread count of [`set_threads`](Self::set_threads).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Whether this is a [`frozen`](Self::frozen) view.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// A parameter as used in the forward pass: itself, or detached in a frozen view.
    pub(crate) fn param(&self, v: &Var) -> Tensor {
        if self.frozen { v.as_tensor().detach() } else { v.as_tensor().clone() }
    }

    /// `h W` for the output layer's weights: on CPU the members over threads, and a
    /// frozen view skips the weight gradient.
    fn layer_matmul(&self, h: &Tensor, w: &Tensor) -> Result<Tensor> {
        if self.fused {
            Ok(h.apply_op2(w, crate::fused::WeightMatmul { threads: self.threads })?)
        } else {
            Ok(h.matmul(w)?)
        }
    }

    /// All parameters in a fixed order: per layer weight and bias, then the log-variance
    /// bounds (the order of [`crate::OptimizerState`]'s moments).
    pub(crate) fn vars(&self) -> Vec<Var> {
        let mut v = Vec::with_capacity(2 * self.layers.len() + 2);
        for l in &self.layers {
            v.push(l.weight.clone());
            v.push(l.bias.clone());
        }
        v.push(self.max_logvar.clone());
        v.push(self.min_logvar.clone());
        v
    }

    /// A copy of the parameters, scaler and elites (deep: later updates of the
    /// parameters, which happen in place, do not reach it).
    pub fn snapshot(&self) -> Result<EnsembleSnapshot> {
        let params = self.vars().iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<_>>()?;
        Ok(EnsembleSnapshot {
            params,
            scaler_mean: self.scaler_mean.clone(),
            scaler_std: self.scaler_std.clone(),
            elites: self.elites.clone(),
        })
    }

    /// Puts back a [`snapshot`](Self::snapshot) of this ensemble.
    pub fn restore(&mut self, s: &EnsembleSnapshot) -> Result<()> {
        for (v, t) in self.vars().iter().zip(&s.params) {
            v.set(t)?;
        }
        self.set_scaler(s.scaler_mean.clone(), s.scaler_std.clone())?;
        self.elites = s.elites.clone();
        Ok(())
    }

    /// Sets the input scaler; a std below 1e-12 becomes 1 (constant inputs).
    pub fn set_scaler(&mut self, mean: Vec<f64>, std: Vec<f64>) -> Result<()> {
        if mean.len() != self.in_dim() || std.len() != self.in_dim() {
            return Err(Error::Data(format!("scaler needs {} entries", self.in_dim())));
        }
        let std: Vec<f64> = std.into_iter().map(|s| if s.is_finite() && s >= 1e-12 { s } else { 1.0 }).collect();
        let inv: Vec<f64> = std.iter().map(|s| 1.0 / s).collect();
        self.scaler_mean_t = host_tensor(mean.clone(), &[1, self.in_dim()], self.dtype, &self.device)?;
        self.scaler_inv_std_t = host_tensor(inv, &[1, self.in_dim()], self.dtype, &self.device)?;
        self.scaler_mean = mean;
        self.scaler_std = std;
        Ok(())
    }

    /// `(x - mean) / std` for raw `x` of shape `B x in` (differentiable).
    pub fn standardise(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_sub(&self.scaler_mean_t)?.broadcast_mul(&self.scaler_inv_std_t)?)
    }

    /// The log-variance bounds of section 2: `lv = max - softplus(max - raw)`,
    /// then `lv = min + softplus(lv - min)`.
    fn bound_logvar(&self, raw: &Tensor) -> Result<Tensor> {
        let maxv = self.param(&self.max_logvar);
        let minv = self.param(&self.min_logvar);
        let lv = maxv.broadcast_sub(&softplus(&maxv.broadcast_sub(raw)?)?)?;
        Ok(minv.broadcast_add(&softplus(&lv.broadcast_sub(&minv)?)?)?)
    }

    /// Forward pass on standardised inputs `E' x B x in` (`E'` = E, or 1 with `member`),
    /// with optional forward-mode tangents.
    ///
    /// `tangent = Some((t0, start, k))`: `t0` is `E' x (Bt * k) x in` in standardised
    /// units, `k` directions for each of the `Bt` input rows `start..start + Bt` (row-major:
    /// point, then direction). Each hidden layer maps `t -> silu'(z) * (t W)` (section 3),
    /// so `J · v` costs about `k` extra forward passes and needs only first-order autograd.
    /// Mean and log-variance are then formed for the rows before `start` only
    /// ([`head_rows`]).
    pub(crate) fn forward_std(
        &self,
        x: &Tensor,
        member: Option<usize>,
        tangent: Option<(&Tensor, usize, usize)>,
    ) -> Result<TangentOutput> {
        self.forward_std_with(x, member, tangent, false)
    }

    /// [`forward_std`](Self::forward_std); with `taped` on the fused CPU path of a
    /// trainable ensemble, the hidden stack runs outside the graph and its
    /// [`Tape`](crate::fused::Tape) comes with the output.
    pub(crate) fn forward_std_with(
        &self,
        x: &Tensor,
        member: Option<usize>,
        tangent: Option<(&Tensor, usize, usize)>,
        taped: bool,
    ) -> Result<TangentOutput> {
        if self.fused {
            self.forward_fused(x, member, tangent, taped && member.is_none() && !self.frozen)
        } else {
            self.forward_plain(x, member, tangent)
        }
    }

    /// CPU path: base and tangent rows stacked, one matmul per layer, the fused
    /// [`SiluTangent`] kernel for bias + activation + tangent scaling.
    fn forward_fused(
        &self,
        x: &Tensor,
        member: Option<usize>,
        tangent: Option<(&Tensor, usize, usize)>,
        taped: bool,
    ) -> Result<TangentOutput> {
        let od = self.out_dim();
        let (ep, base, _) = x.dims3()?;
        let (mut h, op) = match tangent {
            Some((t0, start, k)) => (Tensor::cat(&[x, t0], 1)?, SiluTangent { base, start, k }),
            None => (x.clone(), SiluTangent { base, start: 0, k: 1 }),
        };
        let last = self.layers.len() - 1;
        let (w, b) = self.layers[last].params(member, self.frozen)?;
        let (y, tape) = if taped {
            let hidden =
                self.layers[..last].iter().map(|l| l.params(member, self.frozen)).collect::<Result<Vec<_>>>()?;
            let (tape, y) = crate::fused::Tape::forward(&h, &hidden, &w, op, self.threads)?;
            (y, Some(tape))
        } else {
            for layer in &self.layers[..last] {
                let (w, b) = layer.params(member, self.frozen)?;
                h = h.apply_op3(&w, &b.contiguous()?, HiddenLayer::new(op, self.threads))?;
            }
            (self.layer_matmul(&h, &w)?, None)
        };
        let t = match tangent {
            Some(_) => Some(y.narrow(1, base, y.dim(1)? - base)?.narrow(D::Minus1, 0, od)?),
            None => None,
        };
        let heads = head_rows(base, tangent);
        if heads == 0 {
            let empty = Tensor::zeros((ep, 0, od), self.dtype, &self.device)?;
            return Ok(TangentOutput { mean: empty.clone(), logvar: empty, tangent: t, tape });
        }
        // Bias through a ones-column matmul: its gradient is then a matmul too, not a
        // reduction over the batch axis.
        let ones = Tensor::ones((ep, heads, 1), self.dtype, &self.device)?;
        let out = (y.narrow(1, 0, heads)? + ones.matmul(&b)?)?;
        let mean = out.narrow(D::Minus1, 0, od)?;
        let raw = out.narrow(D::Minus1, od, od)?;
        let logvar = self.bound_logvar(&raw)?;
        Ok(TangentOutput { mean, logvar, tangent: t, tape })
    }

    /// Device-independent path written with candle's ops (used off-CPU, and in tests
    /// as an independent check of the fused kernel).
    fn forward_plain(
        &self,
        x: &Tensor,
        member: Option<usize>,
        tangent: Option<(&Tensor, usize, usize)>,
    ) -> Result<TangentOutput> {
        let od = self.out_dim();
        let last = self.layers.len() - 1;
        let mut h = x.clone();
        let mut t = tangent.map(|(t0, _, _)| t0.clone());
        for (l, layer) in self.layers.iter().enumerate() {
            let (w, b) = layer.params(member, self.frozen)?;
            let z = h.matmul(&w)?.broadcast_add(&b)?;
            if l == last {
                if let Some(tt) = t.take() {
                    let wm = w.narrow(D::Minus1, 0, od)?.contiguous()?;
                    t = Some(tt.matmul(&wm)?);
                }
                h = z;
                break;
            }
            // sigmoid written with differentiable primitives: the tangent needs silu'(z).
            let s = (z.neg()?.exp()? + 1.0)?.recip()?;
            let a = (&z * &s)?;
            if let (Some(tt), Some((_, start, k))) = (t.take(), tangent) {
                let (ep, rows, _) = tt.dims3()?;
                let bt = rows / k;
                // silu'(z) = s + silu(z) (1 - s)
                let a_t = a.narrow(1, start, bt)?;
                let s_t = s.narrow(1, start, bt)?;
                let d = ((&s_t + &a_t)? - (&a_t * &s_t)?)?;
                let wt = tt.matmul(&w)?;
                let o = wt.dim(D::Minus1)?;
                let nt = wt.reshape((ep, bt, k, o))?.broadcast_mul(&d.unsqueeze(2)?)?.reshape((ep, bt * k, o))?;
                t = Some(nt);
            }
            h = a;
        }
        let h = h.narrow(1, 0, head_rows(h.dim(1)?, tangent))?;
        let mean = h.narrow(D::Minus1, 0, od)?;
        let raw = h.narrow(D::Minus1, od, od)?;
        if raw.dim(1)? == 0 {
            return Ok(TangentOutput { mean: raw.clone(), logvar: raw, tangent: t, tape: None });
        }
        let logvar = self.bound_logvar(&raw)?;
        Ok(TangentOutput { mean, logvar, tangent: t, tape: None })
    }

    /// Forward pass of all members with the directional derivatives `J · t0` of the
    /// mean (standardised inputs; `t0`: `E x (Bt * k) x in`, `k` directions for each of
    /// the base rows `start..start + Bt`, as in [`forward_std`](Self::forward_std)).
    ///
    /// `J · t0` is linear in `t0`, so when there are more directions than input
    /// dimensions (`k > in`, e.g. InvertedPendulum: n = 10 > 5, Hopper: 25 > 14) the
    /// `in` columns of `J` are propagated as unit tangents instead and contracted with
    /// `t0` afterwards: the same `J · t0` (up to float rounding) from `in` instead of
    /// `k` tangent rows per point, which are most of the cost of the gradient loss.
    pub(crate) fn forward_jv(&self, x: &Tensor, start: usize, t0: &Tensor, k: usize) -> Result<TangentOutput> {
        self.forward_jv_with(x, start, t0, k, false)
    }

    /// [`forward_jv`](Self::forward_jv), `taped` as in
    /// [`forward_std_with`](Self::forward_std_with).
    pub(crate) fn forward_jv_with(
        &self,
        x: &Tensor,
        start: usize,
        t0: &Tensor,
        k: usize,
        taped: bool,
    ) -> Result<TangentOutput> {
        let (ind, od) = (self.in_dim(), self.out_dim());
        if k <= ind {
            return self.forward_std_with(x, None, Some((t0, start, k)), taped);
        }
        let (e, rows, _) = t0.dims3()?;
        let bt = rows / k;
        let eye = Tensor::eye(ind, self.dtype, &self.device)?
            .unsqueeze(0)?
            .broadcast_as((e * bt, ind, ind))?
            .reshape((e, bt * ind, ind))?;
        let mut out = self.forward_std_with(x, None, Some((&eye, start, ind)), taped)?;
        let cols =
            out.tangent.take().ok_or_else(|| Error::Internal("no tangent".into()))?.reshape((e * bt, ind, od))?;
        let v = t0.reshape((e * bt, k, ind))?;
        let jv = if self.fused {
            v.contiguous()?.apply_op2(
                &cols.contiguous()?,
                crate::fused::SmallBatchedMatmul { kind: crate::fused::SmallProduct::Forward, threads: self.threads },
            )?
        } else {
            v.matmul(&cols)?
        };
        out.tangent = Some(jv.reshape((e, bt * k, od))?);
        Ok(out)
    }

    /// Chooses the fused CPU kernel (default on CPU) or the plain candle-op path.
    #[doc(hidden)]
    pub fn set_fused_kernels(&mut self, on: bool) {
        self.fused = on && self.device.is_cpu();
    }

    /// Builds training minibatches by device-side gathers from data uploaded once
    /// per training call and reads the loss back once per epoch (default off the
    /// CPU), or on the host per minibatch (default on the CPU). Both give the same
    /// minibatches; on the CPU the switch lets tests run the device path.
    #[doc(hidden)]
    pub fn set_device_batches(&mut self, on: bool) {
        self.device_batches = on;
    }

    /// One elite per row, uniformly (ALGORITHM.md section 2, rollout step).
    pub fn draw_elites(&self, rows: usize, rng: &mut impl Rng) -> Vec<usize> {
        let k = self.elites.len();
        (0..rows).map(|_| self.elites[rng.random_range(0..k)]).collect()
    }

    fn check_rows(&self, obs: &Tensor, act: &Tensor, members: &[usize]) -> Result<usize> {
        let (b, od) = obs.dims2().map_err(|_| Error::Data(format!("obs must be B x {}", self.obs_dim)))?;
        let (b2, ad) = act.dims2().map_err(|_| Error::Data(format!("act must be B x {}", self.act_dim)))?;
        if od != self.obs_dim || ad != self.act_dim || b != b2 {
            return Err(Error::Data(format!(
                "obs {b} x {od} and act {b2} x {ad} do not match the model's {} + {}",
                self.obs_dim, self.act_dim
            )));
        }
        if members.len() != b {
            return Err(Error::Data(format!("{} members given for {b} rows", members.len())));
        }
        if let Some(m) = members.iter().find(|&&m| m >= self.cfg.ensemble_size) {
            return Err(Error::Data(format!("member {m} out of range 0..{}", self.cfg.ensemble_size)));
        }
        Ok(b)
    }

    /// Groups the rows of several model steps by member (`steps[t][row]` is the
    /// member predicting `row` at step `t`), with every row index on the device
    /// in one upload: a policy update draws the members of all its steps first,
    /// so its steps make no host-device copy for them.
    pub fn group_members(&self, steps: &[&[usize]]) -> Result<Vec<MemberGroups>> {
        let mut flat: Vec<u32> = Vec::new();
        // Per step: (member, start, len) of each used member's rows in `flat`, and
        // where the inverse permutation starts (when more than one member is used).
        let mut plans = Vec::with_capacity(steps.len());
        for members in steps {
            if let Some(m) = members.iter().find(|&&m| m >= self.cfg.ensemble_size) {
                return Err(Error::Data(format!("member {m} out of range 0..{}", self.cfg.ensemble_size)));
            }
            let mut groups: Vec<Vec<u32>> = vec![Vec::new(); self.cfg.ensemble_size];
            for (row, &m) in members.iter().enumerate() {
                groups[m].push(row as u32);
            }
            let used: Vec<usize> = (0..groups.len()).filter(|&m| !groups[m].is_empty()).collect();
            if used.len() <= 1 {
                plans.push((members.len(), used, Vec::new(), None));
                continue;
            }
            let mut spans = Vec::with_capacity(used.len());
            let mut inverse = vec![0u32; members.len()];
            let mut pos = 0u32;
            for &m in &used {
                spans.push((flat.len(), groups[m].len()));
                flat.extend_from_slice(&groups[m]);
                for &row in &groups[m] {
                    inverse[row as usize] = pos;
                    pos += 1;
                }
            }
            let inv_start = flat.len();
            flat.extend_from_slice(&inverse);
            plans.push((members.len(), used, spans, Some(inv_start)));
        }
        let n = flat.len();
        let all = if n == 0 { None } else { Some(crate::transfer::upload(flat, &[n], &self.device)?) };
        plans
            .into_iter()
            .map(|(rows, used, spans, inv_start)| {
                let Some(all) = all.as_ref().filter(|_| used.len() > 1) else {
                    let groups = used.into_iter().map(|m| (m, None)).collect();
                    return Ok(MemberGroups { rows, groups, inverse: None });
                };
                let groups = used
                    .iter()
                    .zip(&spans)
                    .map(|(&m, &(start, len))| Ok((m, Some(all.narrow(0, start, len)?))))
                    .collect::<Result<Vec<_>>>()?;
                let inverse = inv_start.map(|s| all.narrow(0, s, rows)).transpose()?;
                Ok(MemberGroups { rows, groups, inverse })
            })
            .collect()
    }

    /// Mean and log-variance of `(r, ds)` of the given member for each row; only the
    /// members actually used run, each on its own rows (grouped with `index_select`,
    /// scattered back), never every member on every row.
    fn member_rows(&self, obs: &Tensor, act: &Tensor, members: &[usize]) -> Result<(Tensor, Tensor)> {
        self.check_rows(obs, act, members)?;
        let groups = self.group_members(&[members])?.pop().ok_or_else(|| Error::Internal("no member groups".into()))?;
        self.grouped_rows(obs, act, &groups)
    }

    /// [`member_rows`](Self::member_rows) on rows grouped beforehand.
    fn grouped_rows(&self, obs: &Tensor, act: &Tensor, groups: &MemberGroups) -> Result<(Tensor, Tensor)> {
        let ((b, od), (b2, ad)) = (obs.dims2()?, act.dims2()?);
        if od != self.obs_dim || ad != self.act_dim || b != b2 || b != groups.rows {
            return Err(Error::Data(format!(
                "obs {b} x {od} and act {b2} x {ad} do not match the model's {} + {} and {} grouped rows",
                self.obs_dim, self.act_dim, groups.rows
            )));
        }
        let x = self.standardise(&Tensor::cat(&[obs, act], 1)?)?;
        if let [(m, None)] = groups.groups.as_slice() {
            let out = self.forward_std(&x.unsqueeze(0)?, Some(*m), None)?;
            return Ok((out.mean.squeeze(0)?, out.logvar.squeeze(0)?));
        }
        let inverse = groups.inverse.as_ref().ok_or_else(|| Error::Data("no rows to predict".into()))?;
        let mut means = Vec::with_capacity(groups.groups.len());
        let mut lvs = Vec::with_capacity(groups.groups.len());
        for (m, idx) in &groups.groups {
            let idx = idx.as_ref().ok_or_else(|| Error::Internal("member group without rows".into()))?;
            let xm = x.index_select(idx, 0)?.unsqueeze(0)?;
            let out = self.forward_std(&xm, Some(*m), None)?;
            means.push(out.mean.squeeze(0)?);
            lvs.push(out.logvar.squeeze(0)?);
        }
        let mean = Tensor::cat(&means, 0)?.index_select(inverse, 0)?;
        let lv = Tensor::cat(&lvs, 0)?.index_select(inverse, 0)?;
        Ok((mean, lv))
    }

    /// [`mean`](Self::mean) on rows grouped by [`group_members`](Self::group_members).
    pub fn mean_grouped(&self, obs: &Tensor, act: &Tensor, groups: &MemberGroups) -> Result<ModelStep> {
        let (mean, _) = self.grouped_rows(obs, act, groups)?;
        self.to_step(obs, &mean)
    }

    /// A sample `y = mu + exp(lv / 2) eps` for given standard-normal `eps` (`B x (1 + obs)`,
    /// on the device), on rows grouped by [`group_members`](Self::group_members): the
    /// value [`sample`](Self::sample) returns for the same draws.
    pub fn sample_grouped(&self, obs: &Tensor, act: &Tensor, groups: &MemberGroups, eps: &Tensor) -> Result<ModelStep> {
        let (mean, lv) = self.grouped_rows(obs, act, groups)?;
        let y = (&mean + (lv * 0.5)?.exp()?.mul(eps)?)?;
        self.to_step(obs, &y)
    }

    fn to_step(&self, obs: &Tensor, y: &Tensor) -> Result<ModelStep> {
        let reward = y.narrow(1, 0, 1)?.squeeze(1)?;
        let next_obs = (obs + y.narrow(1, 1, self.obs_dim)?)?;
        Ok(ModelStep { reward, next_obs })
    }

    /// Mean `(r, s')` of the given member for each row, `g(x)` of section 3; differentiable
    /// in `obs` and `act` (`B x obs`, `B x act`, the model's dtype).
    pub fn mean(&self, obs: &Tensor, act: &Tensor, members: &[usize]) -> Result<ModelStep> {
        let (mean, _) = self.member_rows(obs, act, members)?;
        self.to_step(obs, &mean)
    }

    /// A sample `y ~ N(mu, exp(lv))` of the given member per row (noise from `rng`),
    /// and the mean: `(sample, mean)`.
    pub fn sample(
        &self,
        obs: &Tensor,
        act: &Tensor,
        members: &[usize],
        rng: &mut impl Rng,
    ) -> Result<(ModelStep, ModelStep)> {
        let (mean, lv) = self.member_rows(obs, act, members)?;
        let (b, od) = mean.dims2()?;
        let eps: Vec<f64> = (0..b * od).map(|_| rng.sample(StandardNormal)).collect();
        let eps = host_tensor(eps, &[b, od], self.dtype, &self.device)?;
        let y = (&mean + (lv * 0.5)?.exp()?.mul(&eps)?)?;
        Ok((self.to_step(obs, &y)?, self.to_step(obs, &mean)?))
    }

    /// `d(r, s')/d(s, a)` of one member's mean: `B x (1 + obs) x (obs + act)`, by
    /// forward-mode tangents along the unit directions (diagnostics, gradient error).
    pub fn jacobian(&self, obs: &Tensor, act: &Tensor, member: usize) -> Result<Tensor> {
        let b = self.check_rows(obs, act, &vec![member; obs.dim(0).unwrap_or(0)])?;
        let ind = self.in_dim();
        let od = self.out_dim();
        let x = self.standardise(&Tensor::cat(&[obs, act], 1)?)?.unsqueeze(0)?;
        // Unit direction e_i in raw x is e_i / std_i in standardised units.
        let mut t0 = vec![0.0; b * ind * ind];
        for r in 0..b {
            for i in 0..ind {
                t0[(r * ind + i) * ind + i] = 1.0 / self.scaler_std[i];
            }
        }
        let t0 = host_tensor(t0, &[1, b * ind, ind], self.dtype, &self.device)?;
        let out = self.forward_std(&x, Some(member), Some((&t0, 0, ind)))?;
        let t = out.tangent.ok_or_else(|| Error::Internal("no tangent".into()))?;
        // s' = s + ds, so d s'/d s gains the identity.
        let mut eye = vec![0.0; od * ind];
        for i in 0..self.obs_dim {
            eye[(1 + i) * ind + i] = 1.0;
        }
        let eye = host_tensor(eye, &[1, od, ind], self.dtype, &self.device)?;
        Ok(t.reshape((b, ind, od))?.transpose(1, 2)?.broadcast_add(&eye)?.contiguous()?)
    }

    /// Directional derivatives `J_g(x) · v` of every member's mean `g(x) = (r, s + ds)`
    /// in raw units, by forward-mode tangents (section 3): `x` is `E x B x in`, `v` is
    /// `E x (B * k) x in` (`k` directions per point, point-major), result `E x (B * k) x out`.
    pub fn jvp(&self, x: &Tensor, v: &Tensor, k: usize) -> Result<Tensor> {
        let (e, b, ind) = x.dims3()?;
        let (e2, bk, ind2) = v.dims3()?;
        if e != self.cfg.ensemble_size || e2 != e || ind != self.in_dim() || ind2 != ind || k == 0 || bk != b * k {
            return Err(Error::Data(format!(
                "jvp needs x E x B x {} and v E x (B * k) x {} with E = {}",
                self.in_dim(),
                self.in_dim(),
                self.cfg.ensemble_size
            )));
        }
        let xs = self.standardise(x)?;
        let t0 = v.broadcast_mul(&self.scaler_inv_std_t)?;
        let out = self.forward_jv(&xs, 0, &t0, k)?;
        let t = out.tangent.ok_or_else(|| Error::Internal("no tangent".into()))?;
        // g = (r, s + ds): the s part adds v_s itself.
        let zeros = Tensor::zeros((e, bk, 1), self.dtype, &self.device)?;
        let vs = Tensor::cat(&[&zeros, &v.narrow(2, 0, self.obs_dim)?], 2)?;
        Ok((t + vs)?)
    }

    /// Mean squared error of each member's mean `(r, ds)` on standardised inputs
    /// `H x in` against targets `H x out` (holdout).
    pub(crate) fn member_mse(&self, x_std: &Tensor, y: &Tensor) -> Result<Vec<f64>> {
        let (h, ind) = x_std.dims2()?;
        let e = self.cfg.ensemble_size;
        let xb = x_std.unsqueeze(0)?.broadcast_as((e, h, ind))?.contiguous()?;
        let out = self.forward_std(&xb.detach(), None, None)?;
        let err = out.mean.broadcast_sub(&y.unsqueeze(0)?)?.sqr()?.mean((1, 2))?;
        crate::transfer::download_f64(&err)
    }

    /// The ensemble's state as named tensors: every parameter under its own
    /// name, `scaler.mean` and `scaler.std` (f64), `elites` (u32). Together
    /// with the config this is the whole ensemble; [`load_tensors`](Self::load_tensors)
    /// takes it back, and a run's checkpoint keeps it in the agent's
    /// parameter tree.
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut map = BTreeMap::new();
        for (name, var) in self.varmap.data().lock().map_err(|_| Error::Internal("lock".into()))?.iter() {
            map.insert(name.clone(), var.as_tensor().clone());
        }
        map.insert("scaler.mean".into(), Tensor::from_slice(&self.scaler_mean, self.in_dim(), &Device::Cpu)?);
        map.insert("scaler.std".into(), Tensor::from_slice(&self.scaler_std, self.in_dim(), &Device::Cpu)?);
        let elites: Vec<u32> = self.elites.iter().map(|&e| e as u32).collect();
        map.insert("elites".into(), Tensor::from_vec(elites, self.elites.len(), &Device::Cpu)?);
        Ok(map)
    }

    /// Sets the state from tensors named as [`tensors`](Self::tensors) names
    /// them (`get` returns the one called so, or an error). Everything is
    /// checked (presence, shapes, elite range) before anything changes; the
    /// error is a plain reason, for the caller to name its file.
    pub fn load_tensors(&mut self, get: &dyn Fn(&str) -> std::result::Result<Tensor, String>) -> Result<()> {
        let bad = Error::Data;
        let vars: Vec<(String, Var)> = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Internal("lock".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut values = Vec::with_capacity(vars.len());
        for (name, var) in &vars {
            let t = get(name).map_err(bad)?;
            if t.dims() != var.dims() {
                return Err(bad(format!("tensor {name} has shape {:?}, expected {:?}", t.dims(), var.dims())));
            }
            values.push(t);
        }
        let get_f64 = |name: &str, n: usize| -> Result<Vec<f64>> {
            let v = get(name).map_err(bad)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            if v.len() != n {
                return Err(bad(format!("{name} has {} entries, expected {n}", v.len())));
            }
            Ok(v)
        };
        let mean = get_f64("scaler.mean", self.in_dim())?;
        let std = get_f64("scaler.std", self.in_dim())?;
        let elites = get("elites").map_err(bad)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        if elites.is_empty() || elites.iter().any(|&e| e as usize >= self.cfg.ensemble_size) {
            return Err(bad("elite list out of range".into()));
        }
        for ((_, var), t) in vars.iter().zip(values) {
            var.set(&t.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        }
        self.set_scaler(mean, std)?;
        self.elites = elites.into_iter().map(|e| e as usize).collect();
        Ok(())
    }

    /// Saves [`tensors`](Self::tensors) and metadata (dims, config) to one safetensors file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut map: HashMap<String, Tensor> = self.tensors()?.into_iter().collect();
        let meta =
            Metadata { format: FORMAT.into(), obs_dim: self.obs_dim, act_dim: self.act_dim, config: self.cfg.clone() };
        let json = serde_json::to_vec(&meta).map_err(|e| Error::Internal(e.to_string()))?;
        let n = json.len();
        map.insert("meta.json".into(), Tensor::from_vec(json, n, &Device::Cpu)?);
        candle_core::safetensors::save(&map, path)
            .map_err(|e| Error::Checkpoint { path: path.display().to_string(), reason: e.to_string() })
    }

    /// Loads a file written by [`save`](Self::save) into this ensemble; the file must
    /// have the same dims and sizes (else a clear error and nothing is changed).
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let ck = |reason: String| Error::Checkpoint { path: path.display().to_string(), reason };
        let map = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| ck(e.to_string()))?;
        let meta = map.get("meta.json").ok_or_else(|| ck("not a ddppo ensemble file (no metadata)".into()))?;
        let bytes = meta.to_vec1::<u8>().map_err(|e| ck(e.to_string()))?;
        let meta: Metadata = serde_json::from_slice(&bytes).map_err(|e| ck(format!("bad metadata: {e}")))?;
        if meta.format != FORMAT {
            return Err(ck(format!("format {} is not {FORMAT}", meta.format)));
        }
        if meta.obs_dim != self.obs_dim || meta.act_dim != self.act_dim {
            return Err(ck(format!(
                "file has obs_dim {} act_dim {}, model has {} and {}",
                meta.obs_dim, meta.act_dim, self.obs_dim, self.act_dim
            )));
        }
        let (c, m) = (&meta.config, &self.cfg);
        if (c.ensemble_size, c.hidden, c.hidden_layers) != (m.ensemble_size, m.hidden, m.hidden_layers) {
            return Err(ck(format!(
                "file has ensemble_size {} hidden {} x {}, model has {} hidden {} x {}",
                c.ensemble_size, c.hidden_layers, c.hidden, m.ensemble_size, m.hidden_layers, m.hidden
            )));
        }
        let get = |name: &str| map.get(name).cloned().ok_or_else(|| format!("missing tensor {name}"));
        self.load_tensors(&get).map_err(|e| match e {
            Error::Data(reason) => ck(reason),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LossBatch, NeighbourBatch};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn randt(rng: &mut ChaCha8Rng, shape: &[usize], dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.5..1.5)).collect();
        host_tensor(v, shape, dtype, &Device::Cpu).unwrap()
    }

    /// A 3-member ensemble on 2 + 2 inputs with 3 hidden layers of `hidden`
    /// units and every parameter perturbed (so biases and bounds are not at
    /// their initial values).
    fn perturbed_ensemble(rng: &mut ChaCha8Rng, hidden: usize, dtype: DType) -> ProbabilisticEnsemble {
        let cfg = EnsembleConfig {
            ensemble_size: 3,
            elites: 2,
            hidden,
            hidden_layers: 3,
            weight_decay: vec![1e-4; 4],
            ..Default::default()
        };
        let ens = ProbabilisticEnsemble::new(2, 2, &cfg, &Device::Cpu, dtype, rng).unwrap();
        for v in ens.vars() {
            let noise = randt(rng, v.dims(), dtype);
            v.set(&(v.as_tensor() + (noise * 0.2).unwrap()).unwrap()).unwrap();
        }
        ens
    }

    /// With tangents the pass forms mean and log-variance of the rows before the
    /// tangents' points only: the same numbers, bit for bit, as a pass without
    /// tangents over those rows, on the fused and the plain path; a pass whose
    /// tangents start at row 0 has no heads.
    #[test]
    fn tangent_pass_heads_are_those_of_the_rows_before_the_points() {
        for dtype in [DType::F64, DType::F32] {
            for fused in [true, false] {
                let mut rng = ChaCha8Rng::seed_from_u64(11);
                let mut ens = perturbed_ensemble(&mut rng, 24, dtype);
                ens.set_fused_kernels(fused);
                let (e, b, bg, k) = (3, 48, 16, 3);
                let x = randt(&mut rng, &[e, b + bg, 4], dtype);
                let t0 = randt(&mut rng, &[e, bg * k, 4], dtype);
                let with = ens.forward_std(&x, None, Some((&t0, b, k))).unwrap();
                let alone = ens.forward_std(&x.narrow(1, 0, b).unwrap().contiguous().unwrap(), None, None).unwrap();
                let bits = |t: &Tensor| {
                    assert_eq!(t.dims(), &[e, b, 3]);
                    crate::fused::tests::bits(t)
                };
                assert_eq!(bits(&with.mean), bits(&alone.mean), "{dtype:?} fused {fused}: mean");
                assert_eq!(bits(&with.logvar), bits(&alone.logvar), "{dtype:?} fused {fused}: logvar");
                let none =
                    ens.forward_std(&x, None, Some((&randt(&mut rng, &[e, (b + bg) * k, 4], dtype), 0, k))).unwrap();
                assert_eq!((none.mean.dims(), none.logvar.dims()), (&[e, 0, 3][..], &[e, 0, 3][..]));
                assert_eq!(none.tangent.unwrap().dims(), &[e, (b + bg) * k, 3]);
            }
        }
    }

    /// With more directions than inputs, `forward_jv` contracts the Jacobian's columns
    /// with the directions: the same `J · t0` and the same gradients (for every
    /// parameter and for the directions) as propagating the `k` directions themselves.
    #[test]
    fn jacobian_columns_route_equals_direct_tangents() {
        for fused in [true, false] {
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            let mut ens = perturbed_ensemble(&mut rng, 8, DType::F64);
            ens.set_fused_kernels(fused);
            let (e, b, bg, k) = (3, 5, 4, 7);
            assert!(k > ens.in_dim());
            let x = randt(&mut rng, &[e, b + bg, 4], DType::F64);
            let t0 = Var::from_tensor(&randt(&mut rng, &[e, bg * k, 4], DType::F64)).unwrap();
            let run = |route: bool| {
                let out = if route {
                    ens.forward_jv(&x, b, t0.as_tensor(), k).unwrap()
                } else {
                    ens.forward_std(&x, None, Some((t0.as_tensor(), b, k))).unwrap()
                };
                let t = out.tangent.unwrap();
                let loss = (t.sin().unwrap().sum_all().unwrap()
                    + out.mean.sqr().unwrap().sum_all().unwrap()
                    + out.logvar.sum_all().unwrap())
                .unwrap();
                let grads = loss.backward().unwrap();
                let mut all = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                for v in ens.vars().iter().chain([&t0]) {
                    let g = grads.get(v.as_tensor()).unwrap();
                    all.extend(g.flatten_all().unwrap().to_vec1::<f64>().unwrap());
                }
                all
            };
            let (direct, route) = (run(false), run(true));
            assert_eq!(direct.len(), route.len());
            for (i, (a, b)) in route.iter().zip(&direct).enumerate() {
                assert!((a - b).abs() <= 1e-11 * (1.0 + b.abs()), "fused {fused} entry {i}: route {a} direct {b}");
            }
        }
    }

    /// The fused CPU kernel and the plain candle-op path agree on the loss and on
    /// every parameter gradient (f64 exactly, f32 to float tolerance).
    #[test]
    fn fused_kernel_matches_plain_ops() {
        for (dtype, tol) in [(DType::F64, 1e-11), (DType::F32, 2e-4)] {
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let mut ens = perturbed_ensemble(&mut rng, 9, dtype);
            let (e, b, bg, k) = (3, 6, 4, 3);
            let batch = LossBatch {
                x: randt(&mut rng, &[e, b, 4], dtype),
                y: randt(&mut rng, &[e, b, 3], dtype),
                neighbours: Some(NeighbourBatch {
                    points: randt(&mut rng, &[e, bg, 4], dtype),
                    directions: randt(&mut rng, &[e, bg * k, 4], dtype),
                    differences: randt(&mut rng, &[e, bg * k, 3], dtype),
                    k,
                }),
            };
            let run = |ens: &ProbabilisticEnsemble| {
                let terms = ens.loss(&batch, 0.9).unwrap();
                let grads = terms.total.backward().unwrap();
                let mut all = vec![terms.total.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()];
                for v in ens.vars() {
                    let g = grads.get(v.as_tensor()).unwrap();
                    all.extend(g.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap());
                }
                all
            };
            ens.set_fused_kernels(true);
            let fused = run(&ens);
            ens.set_fused_kernels(false);
            let plain = run(&ens);
            assert_eq!(fused.len(), plain.len());
            for (i, (a, b)) in fused.iter().zip(&plain).enumerate() {
                assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{dtype:?} entry {i}: fused {a} plain {b}");
            }
        }
    }

    /// A training step's taped pass (hidden stack outside candle's graph,
    /// [`crate::fused::Tape`]) gives the loss and every parameter gradient of the
    /// whole graph, bit for bit: NLL alone, tangents with `k <= in` and with `k > in`
    /// (the Jacobian-column route), f32 and f64, members over one thread and two.
    #[test]
    fn taped_training_step_matches_the_whole_graph_exactly() {
        for dtype in [DType::F64, DType::F32] {
            for (k, with_neighbours) in [(0, false), (3, true), (6, true)] {
                for threads in [1, 2] {
                    let mut rng = ChaCha8Rng::seed_from_u64(11);
                    // 48 units: enough work per product for the members to be spread.
                    let mut ens = perturbed_ensemble(&mut rng, 48, dtype);
                    ens.set_threads(threads);
                    let (e, b, bg) = (3, 6, 4);
                    let batch = LossBatch {
                        x: randt(&mut rng, &[e, b, 4], dtype),
                        y: randt(&mut rng, &[e, b, 3], dtype),
                        neighbours: with_neighbours.then(|| NeighbourBatch {
                            points: randt(&mut rng, &[e, bg, 4], dtype),
                            directions: randt(&mut rng, &[e, bg * k, 4], dtype),
                            differences: randt(&mut rng, &[e, bg * k, 3], dtype),
                            k,
                        }),
                    };
                    let run = |taped: bool| {
                        let (terms, tape) = ens.training_loss(&batch, 0.9, taped).unwrap();
                        assert_eq!(tape.is_some(), taped, "a tape exactly when asked for");
                        let mut grads = terms.total.backward().unwrap();
                        if let Some(tape) = tape {
                            tape.backward(&mut grads).unwrap();
                        }
                        let mut all = vec![terms.total.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()];
                        for v in ens.vars() {
                            let g = grads.get(v.as_tensor()).expect("every parameter has a gradient");
                            all.extend(
                                g.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(),
                            );
                        }
                        all
                    };
                    let (taped, graph) = (run(true), run(false));
                    assert_eq!(taped.len(), graph.len());
                    for (i, (a, g)) in taped.iter().zip(&graph).enumerate() {
                        // `==`: equal bits, but for the sign of a zero (candle forms 0 + g).
                        assert!(a == g, "{dtype:?} k {k} threads {threads} entry {i}: taped {a} graph {g}");
                    }
                }
            }
        }
    }
}
