//! The SAC pieces of ALGORITHM.md section 5: the tanh-squashed Gaussian
//! policy, the twin Q critic with Polyak-averaged targets (equation 12) and
//! the learned temperature (equation 13).

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;

use candle_core::backprop::GradStore;
use ddppo_models::split::join;

use crate::fused::join_threads;
use crate::nn::{Mlp, host_randn, polyak, sorted_vars};
use crate::{Error, Result};

/// Log-std bounds of the policy (section 5).
pub const LOG_STD_MIN: f64 = -20.0;
/// Log-std bounds of the policy (section 5).
pub const LOG_STD_MAX: f64 = 2.0;
/// The epsilon inside the tanh correction `log(scale (1 - tanh(u)^2) + eps)`.
pub const TANH_EPS: f64 = 1e-6;
const HALF_LOG_2PI: f64 = 0.918_938_533_204_672_8;

/// An action drawn with the reparameterisation trick and its log-density.
#[derive(Clone, Debug)]
pub struct PolicySample {
    /// rows x act_dim, inside the action bounds.
    pub action: Tensor,
    /// rows: log pi(a|s) including the tanh and rescaling correction.
    pub logp: Tensor,
}

/// The tanh-squashed Gaussian policy: `2 x hidden` ReLU trunk, one head of
/// `2 * act_dim` outputs (mean, log-std), actions rescaled to the bounds.
pub struct GaussianPolicy {
    vm: VarMap,
    net: Mlp,
    obs_dim: usize,
    act_dim: usize,
    scale: Vec<f64>,
    bias: Vec<f64>,
    scale_t: Tensor,
    bias_t: Tensor,
    dtype: DType,
    device: Device,
}

impl GaussianPolicy {
    /// A policy for the action box `[low, high]` with hidden widths `hidden`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        obs_dim: usize,
        low: &[f64],
        high: &[f64],
        hidden: &[usize],
        dtype: DType,
        device: &Device,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        if low.len() != high.len() || low.is_empty() {
            return Err(Error::Shape(format!("action bounds: low has {} entries, high {}", low.len(), high.len())));
        }
        if low.iter().zip(high).any(|(l, h)| l >= h || !l.is_finite() || !h.is_finite()) {
            return Err(Error::Shape("action bounds must be finite with low < high".into()));
        }
        let act_dim = low.len();
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, dtype, device).pp("policy");
        let net = Mlp::new(&vm, vb, obs_dim, hidden, 2 * act_dim, rng)?;
        let scale: Vec<f64> = low.iter().zip(high).map(|(l, h)| (h - l) / 2.0).collect();
        let bias: Vec<f64> = low.iter().zip(high).map(|(l, h)| (h + l) / 2.0).collect();
        let scale_t = Tensor::from_slice(&scale, (1, act_dim), device)?.to_dtype(dtype)?;
        let bias_t = Tensor::from_slice(&bias, (1, act_dim), device)?.to_dtype(dtype)?;
        Ok(Self { vm, net, obs_dim, act_dim, scale, bias, scale_t, bias_t, dtype, device: device.clone() })
    }

    /// Observation width.
    pub fn obs_dim(&self) -> usize {
        self.obs_dim
    }
    /// Action width.
    pub fn act_dim(&self) -> usize {
        self.act_dim
    }
    /// Parameter dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Device of the parameters.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The parameters by `VarBuilder` name (`policy.l0.weight`, ...).
    pub fn varmap(&self) -> &VarMap {
        &self.vm
    }
    /// The parameters, sorted by name.
    pub fn vars(&self) -> Vec<Var> {
        sorted_vars(&self.vm).into_iter().map(|(_, v)| v).collect()
    }

    /// Mean and clamped log-std of the pre-squash Gaussian, each rows x act_dim.
    pub fn distribution(&self, obs: &Tensor) -> Result<(Tensor, Tensor)> {
        let out = self.net.forward(obs)?;
        let mu = out.narrow(D::Minus1, 0, self.act_dim)?;
        let log_std = out.narrow(D::Minus1, self.act_dim, self.act_dim)?.clamp(LOG_STD_MIN, LOG_STD_MAX)?;
        Ok((mu, log_std))
    }

    /// `a = tanh(mu + std * eps) * scale + bias` for given standard-normal
    /// noise `eps` (rows x act_dim), differentiable in the parameters and
    /// in `obs`, with
    /// `log pi = sum_i [N(u_i; mu_i, std_i) - log(scale_i (1 - tanh(u_i)^2) + 1e-6)]`.
    /// `(u - mu) / std` is `eps` exactly, which is what the Gaussian term uses.
    pub fn sample_with_noise(&self, obs: &Tensor, eps: &Tensor) -> Result<PolicySample> {
        let (mu, log_std) = self.distribution(obs)?;
        let u = (&mu + (log_std.exp()? * eps)?)?;
        let y = u.tanh()?;
        let action = y.broadcast_mul(&self.scale_t)?.broadcast_add(&self.bias_t)?;
        let gauss = ((eps.sqr()? * -0.5)? - &log_std)?.affine(1.0, -HALF_LOG_2PI)?;
        let correction = (y.sqr()?.affine(-1.0, 1.0)?.broadcast_mul(&self.scale_t)? + TANH_EPS)?.log()?;
        let logp = (gauss - correction)?.sum(D::Minus1)?;
        Ok(PolicySample { action, logp })
    }

    /// A reparameterised sample with noise drawn on the host from `rng`.
    pub fn sample(&self, obs: &Tensor, rng: &mut impl Rng) -> Result<PolicySample> {
        let rows = obs.dim(0)?;
        let eps = host_randn(rng, rows, self.act_dim, self.dtype, &self.device)?;
        self.sample_with_noise(obs, &eps)
    }

    /// The deterministic (evaluation) action `tanh(mu) * scale + bias`.
    pub fn mean_action(&self, obs: &Tensor) -> Result<Tensor> {
        let (mu, _) = self.distribution(obs)?;
        Ok(mu.tanh()?.broadcast_mul(&self.scale_t)?.broadcast_add(&self.bias_t)?)
    }

    /// A host copy of the current weights for acting in environments (one
    /// row at a time, on any thread, without the tensor machinery).
    pub fn snapshot(&self) -> Result<PolicySnapshot> {
        let layers = self
            .net
            .layers()
            .map(|(w, b)| -> Result<(Vec<f64>, Vec<f64>, usize, usize)> {
                let (out, inp) = w.dims2()?;
                let wv = w.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                let bv = match b {
                    Some(b) => b.to_dtype(DType::F64)?.to_vec1::<f64>()?,
                    None => vec![0.0; out],
                };
                Ok((wv, bv, out, inp))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PolicySnapshot { layers, act_dim: self.act_dim, scale: self.scale.clone(), bias: self.bias.clone() })
    }
}

/// Host-side copy of a [`GaussianPolicy`]'s weights (f64 arithmetic).
#[derive(Clone, Debug)]
pub struct PolicySnapshot {
    layers: Vec<(Vec<f64>, Vec<f64>, usize, usize)>,
    act_dim: usize,
    scale: Vec<f64>,
    bias: Vec<f64>,
}

impl PolicySnapshot {
    fn head(&self, obs: &[f64]) -> Vec<f64> {
        let mut h = obs.to_vec();
        let last = self.layers.len() - 1;
        for (i, (w, b, out, inp)) in self.layers.iter().enumerate() {
            let mut z = b.clone();
            for (o, zo) in z.iter_mut().enumerate().take(*out) {
                let row = &w[o * inp..(o + 1) * inp];
                *zo += row.iter().zip(&h).map(|(a, b)| a * b).sum::<f64>();
                if i < last {
                    *zo = zo.max(0.0);
                }
            }
            h = z;
        }
        h
    }

    /// Action width.
    pub fn act_dim(&self) -> usize {
        self.act_dim
    }

    /// The deterministic action `tanh(mu(s)) * scale + bias`.
    pub fn mean_action(&self, obs: &[f64]) -> Vec<f64> {
        let h = self.head(obs);
        (0..self.act_dim).map(|i| h[i].tanh() * self.scale[i] + self.bias[i]).collect()
    }

    /// A stochastic action `tanh(mu + std eps) * scale + bias`, eps from `rng`.
    pub fn sample_action(&self, obs: &[f64], rng: &mut impl Rng) -> Vec<f64> {
        let h = self.head(obs);
        (0..self.act_dim)
            .map(|i| {
                let log_std = h[self.act_dim + i].clamp(LOG_STD_MIN, LOG_STD_MAX);
                let e: f64 = rng.sample(rand_distr::StandardNormal);
                (h[i] + log_std.exp() * e).tanh() * self.scale[i] + self.bias[i]
            })
            .collect()
    }
}

/// Twin Q networks `Q_1, Q_2 : (s, a) -> R` with target copies.
pub struct SacCritic {
    vm: VarMap,
    target_vm: VarMap,
    q: [Mlp; 2],
    q_target: [Mlp; 2],
    vars: Vec<Var>,
    target_vars: Vec<Var>,
}

/// The Bellman target of equation 12,
/// `y = r + mask * gamma * (min(Q1', Q2')(s', a') - alpha log pi(a'|s'))`,
/// all inputs of shape `rows`.
pub fn critic_target(
    rew: &Tensor,
    mask: &Tensor,
    min_q_next: &Tensor,
    logp_next: &Tensor,
    alpha: f64,
    gamma: f64,
) -> Result<Tensor> {
    let soft = (min_q_next - (logp_next * alpha)?)?;
    Ok((rew + (mask * soft)?.affine(gamma, 0.0)?)?)
}

impl SacCritic {
    /// Twin Q networks on `obs_dim + act_dim` inputs; the targets start as
    /// exact copies.
    pub fn new(
        obs_dim: usize,
        act_dim: usize,
        hidden: &[usize],
        dtype: DType,
        device: &Device,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        let vm = VarMap::new();
        let target_vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, dtype, device);
        let tvb = VarBuilder::from_varmap(&target_vm, dtype, device);
        let q1 = Mlp::new(&vm, vb.pp("q1"), obs_dim + act_dim, hidden, 1, rng)?;
        let q2 = Mlp::new(&vm, vb.pp("q2"), obs_dim + act_dim, hidden, 1, rng)?;
        // The target networks get throw-away draws and are then overwritten
        // with copies; a separate generator keeps `rng`'s stream independent
        // of the target's existence.
        let mut scratch = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        let t1 = Mlp::new(&target_vm, tvb.pp("q1"), obs_dim + act_dim, hidden, 1, &mut scratch)?;
        let t2 = Mlp::new(&target_vm, tvb.pp("q2"), obs_dim + act_dim, hidden, 1, &mut scratch)?;
        let vars: Vec<Var> = sorted_vars(&vm).into_iter().map(|(_, v)| v).collect();
        let target_vars: Vec<Var> = sorted_vars(&target_vm).into_iter().map(|(_, v)| v).collect();
        polyak(&target_vars, &vars, 1.0)?;
        Ok(Self { vm, target_vm, q: [q1, q2], q_target: [t1, t2], vars, target_vars })
    }

    /// The online parameters by name (`q1.l0.weight`, ...).
    pub fn varmap(&self) -> &VarMap {
        &self.vm
    }
    /// The target parameters by name.
    pub fn target_varmap(&self) -> &VarMap {
        &self.target_vm
    }
    /// Online parameters sorted by name.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Both networks at `(obs, act)`, each on its own thread when a helper is
    /// idle ([`ddppo_models::split::join`]; the same numbers either way).
    fn eval(nets: &[Mlp; 2], obs: &Tensor, act: &Tensor) -> Result<(Tensor, Tensor)> {
        let x = Tensor::cat(&[obs, act], 1)?;
        let q = |net: &Mlp| -> Result<Tensor> { Ok(net.forward(&x)?.squeeze(1)?) };
        let (a, b) = join(join_threads(&x, x.dim(0)? * nets[0].work_per_row()), || q(&nets[0]), || q(&nets[1]));
        Ok((a?, b?))
    }

    /// `(Q1(s, a), Q2(s, a))`, each of shape rows.
    pub fn q(&self, obs: &Tensor, act: &Tensor) -> Result<(Tensor, Tensor)> {
        Self::eval(&self.q, obs, act)
    }

    /// `min(Q1, Q2)(s, a)` of the online networks, differentiable in `s, a`.
    pub fn min_q(&self, obs: &Tensor, act: &Tensor) -> Result<Tensor> {
        let (a, b) = self.q(obs, act)?;
        Ok(a.minimum(&b)?)
    }

    /// `min(Q1, Q2)(s, a)` of the online networks with their parameters held
    /// constant: differentiable in `s, a` only (the policy update's terminal
    /// value, equation 11), so no critic gradients are computed.
    pub fn min_q_frozen(&self, obs: &Tensor, act: &Tensor) -> Result<Tensor> {
        let x = Tensor::cat(&[obs, act], 1)?;
        let q = |net: &Mlp| -> Result<Tensor> { Ok(net.forward_frozen(&x)?.squeeze(1)?) };
        let (a, b) = join(join_threads(&x, x.dim(0)? * self.q[0].work_per_row()), || q(&self.q[0]), || q(&self.q[1]));
        Ok(a?.minimum(&b?)?)
    }

    /// `min(Q1', Q2')(s, a)` of the target networks.
    pub fn target_min_q(&self, obs: &Tensor, act: &Tensor) -> Result<Tensor> {
        let (a, b) = Self::eval(&self.q_target, obs, act)?;
        Ok(a.minimum(&b)?.detach())
    }

    /// `y` of equation 12 ([`critic_target`]) at `a' ~ pi(s')` drawn from
    /// `rng`, detached.
    fn target(
        &self,
        policy: &GaussianPolicy,
        rew: &Tensor,
        next_obs: &Tensor,
        mask: &Tensor,
        (alpha, gamma): (f64, f64),
        rng: &mut impl Rng,
    ) -> Result<Tensor> {
        let next = policy.sample(next_obs, rng)?;
        let min_q_next = self.target_min_q(next_obs, &next.action.detach())?;
        Ok(critic_target(rew, mask, &min_q_next, &next.logp.detach(), alpha, gamma)?.detach())
    }

    /// The loss of equation 12: `mean((Q1 - y)^2) + mean((Q2 - y)^2)` with
    /// `y` from [`critic_target`] (no gradient through `y`).
    #[allow(clippy::too_many_arguments)]
    pub fn loss(
        &self,
        policy: &GaussianPolicy,
        obs: &Tensor,
        act: &Tensor,
        rew: &Tensor,
        next_obs: &Tensor,
        mask: &Tensor,
        alpha: f64,
        gamma: f64,
        rng: &mut impl Rng,
    ) -> Result<Tensor> {
        let y = self.target(policy, rew, next_obs, mask, (alpha, gamma), rng)?;
        let (q1, q2) = self.q(obs, act)?;
        Ok(((q1 - &y)?.sqr()?.mean_all()? + (q2 - &y)?.sqr()?.mean_all()?)?)
    }

    /// The loss of [`SacCritic::loss`] (same draws from `rng`, same value) and
    /// its gradients: each network's term, `mean((Qi - y)^2)`, forward and
    /// backward on its own thread when a helper is idle. The networks share
    /// no parameter, so each term's backward pass forms exactly the gradients
    /// the sum's does (the sum passes its gradient of 1 to each term
    /// unchanged); the two stores hold the first and second network's.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_and_grads(
        &self,
        policy: &GaussianPolicy,
        obs: &Tensor,
        act: &Tensor,
        rew: &Tensor,
        next_obs: &Tensor,
        mask: &Tensor,
        alpha: f64,
        gamma: f64,
        rng: &mut impl Rng,
    ) -> Result<(Tensor, [GradStore; 2])> {
        let y = self.target(policy, rew, next_obs, mask, (alpha, gamma), rng)?;
        let x = Tensor::cat(&[obs, act], 1)?;
        let term = |net: &Mlp| -> Result<(Tensor, GradStore)> {
            let l = (net.forward(&x)?.squeeze(1)? - &y)?.sqr()?.mean_all()?;
            let g = l.backward()?;
            Ok((l, g))
        };
        let (a, b) =
            join(join_threads(&x, x.dim(0)? * self.q[0].work_per_row()), || term(&self.q[0]), || term(&self.q[1]));
        let ((l1, g1), (l2, g2)) = (a?, b?);
        Ok(((l1 + l2)?, [g1, g2]))
    }

    /// Polyak update of the targets with rate `tau`.
    pub fn update_targets(&self, tau: f64) -> Result<()> {
        polyak(&self.target_vars, &self.vars, tau)
    }
}

/// The learned temperature `alpha = exp(log_alpha)` with target entropy
/// `-dim(A)` (section 5).
#[derive(Debug)]
pub struct Temperature {
    log_alpha: Var,
    /// The target entropy, `-dim(A)` by default.
    pub target_entropy: f64,
}

impl Temperature {
    /// Starts at `alpha = init` (the SAC reference starts at 1).
    pub fn new(init: f64, target_entropy: f64, dtype: DType, device: &Device) -> Result<Self> {
        if !(init > 0.0 && init.is_finite()) {
            return Err(Error::Config(format!("initial alpha must be positive, got {init}")));
        }
        let log_alpha = Var::from_tensor(&Tensor::new(&[init.ln()], device)?.to_dtype(dtype)?)?;
        Ok(Self { log_alpha, target_entropy })
    }

    /// The variable `log_alpha` (shape 1).
    pub fn var(&self) -> &Var {
        &self.log_alpha
    }

    /// Current `alpha`.
    pub fn alpha(&self) -> Result<f64> {
        let log_alpha = ddppo_models::transfer::download_f64(self.log_alpha.as_tensor())?;
        Ok(log_alpha.first().copied().unwrap_or(f64::NAN).exp())
    }

    /// Equation 13, `J(alpha) = mean(-alpha (log pi + target_entropy))`, with
    /// `log pi` held constant; differentiable in `log_alpha`.
    pub fn loss(&self, logp: &Tensor) -> Result<Tensor> {
        let alpha = self.log_alpha.as_tensor().exp()?;
        let shifted = (logp.detach() + self.target_entropy)?;
        Ok(shifted.broadcast_mul(&alpha)?.mean_all()?.neg()?)
    }
}
