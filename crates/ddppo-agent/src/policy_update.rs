//! The policy update of ALGORITHM.md section 4: back-propagating the SAC
//! objective of equation 11 through `H` steps of the learned model, values
//! from the prediction model, derivatives from the gradient model.

use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;

use ddppo_models::transfer;

use crate::rollout::{DynamicsModel, Members, ModelEnv};
use crate::sac::{GaussianPolicy, SacCritic};
use crate::{Error, Result};

/// What the forward pass of equation 11 drew and saw, enough to recompute the
/// gradient by the explicit adjoint recursion ([`adjoint_policy_gradient`]).
#[derive(Clone, Debug)]
pub struct ImaginedTrajectory {
    /// `s_0 .. s_H` (values, detached), each rows x obs_dim.
    pub states: Vec<Tensor>,
    /// The policy's standard-normal noise for `a_0 .. a_H`.
    pub noise: Vec<Tensor>,
    /// Gradient-model members per step `0 .. H-1`.
    pub gradient_members: Vec<Vec<usize>>,
    /// `alive_t` for `t = 0 .. H`: 1 while no step before `t` terminated.
    pub alive: Vec<Vec<f64>>,
}

/// The objective of equation 11 for one batch of start states.
#[derive(Debug)]
pub struct PolicyObjective {
    /// `J / B` (a scalar), differentiable in the policy's parameters.
    pub objective: Tensor,
    /// `log pi(a_0 | s_0)` per row, detached (for the temperature update).
    pub logp0: Tensor,
    /// Per row, the model steps' part of `J`,
    /// `sum_{t<H} gamma^t alive_t (r_t - alpha log pi_t)` (differentiable).
    pub model_steps: Tensor,
    /// Per row, the terminal part `gamma^H alive_H (min Q - alpha log pi_H)` (differentiable).
    pub terminal: Tensor,
    /// The forward pass's record.
    pub trajectory: ImaginedTrajectory,
}

fn mask_tensor(alive: &[f64], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(alive, alive.len(), device)?.to_dtype(dtype)?)
}

/// Equation 11 by the straight-through single backward:
///
/// `J = sum_{t<H} gamma^t alive_t (r_t - alpha log pi(a_t|s_t))
///      + gamma^H alive_H (min(Q1, Q2)(s_H, a_H) - alpha log pi(a_H|s_H))`,
///
/// `a_t = pi(s_t)` reparameterised, `(r_t, s_{t+1})` from the model env
/// (rollout-model value, gradient-model derivative), `alive_t = 0` once
/// any earlier step hit the termination function. Returns `J / B`.
///
/// Everything random is drawn before the first step ([`ModelEnv::draw`]);
/// the states of all steps are then read back once for the termination
/// function and the masks uploaded once, so the host-device copies do not
/// grow with `H`.
#[allow(clippy::too_many_arguments)]
pub fn policy_objective(
    policy: &GaussianPolicy,
    critic: &SacCritic,
    env: &ModelEnv,
    start: &Tensor,
    horizon: usize,
    gamma: f64,
    alpha: f64,
    rng: &mut ChaCha8Rng,
) -> Result<PolicyObjective> {
    if horizon == 0 {
        return Err(Error::Config("policy horizon H must be at least 1".into()));
    }
    let (rows, _) = start.dims2()?;
    let (dtype, device) = (policy.dtype(), policy.device().clone());
    let draws = env.draw(rows, policy.act_dim(), horizon, dtype, &device, rng)?;
    let mut s = start.detach();
    let mut record = ImaginedTrajectory {
        states: vec![s.detach()],
        noise: Vec::with_capacity(horizon + 1),
        gradient_members: Vec::with_capacity(horizon),
        alive: Vec::with_capacity(horizon + 1),
    };
    // Per step `r_t - alpha log pi(a_t|s_t)`, masked once the dones are known.
    let mut rewards = Vec::with_capacity(horizon);
    let mut sampled = Vec::with_capacity(horizon);
    let mut logp0 = None;
    for t in 0..horizon {
        let eps = draws.policy_noise(t)?;
        let a = policy.sample_with_noise(&s, &eps)?;
        if logp0.is_none() {
            logp0 = Some(a.logp.detach());
        }
        let step = env.imagine_step(&s, &a.action, &draws, t)?;
        rewards.push((&step.reward - (&a.logp * alpha)?)?);
        sampled.push(step.sampled_next_obs);
        record.noise.push(eps);
        record.gradient_members.push(draws.gradient_members(t).to_vec());
        s = step.next_obs;
        record.states.push(s.detach());
    }
    let eps = draws.policy_noise(horizon)?;
    let a = policy.sample_with_noise(&s, &eps)?;
    record.noise.push(eps);
    let q = critic.min_q_frozen(&s, &a.action)?;
    let terminal = (q - (&a.logp * alpha)?)?;

    let mut alive = vec![1.0f64; rows];
    record.alive.push(alive.clone());
    for done in env.terminations_of_steps(&sampled)? {
        for (al, d) in alive.iter_mut().zip(&done) {
            if *d {
                *al = 0.0;
            }
        }
        record.alive.push(alive.clone());
    }
    let masks = transfer::upload_f64(record.alive.concat(), &[horizon + 1, rows], dtype, &device)?;
    let mut total: Option<Tensor> = None;
    let mut discount = 1.0;
    for (t, r) in rewards.into_iter().enumerate() {
        let term = (r * masks.get(t)?)?.affine(discount, 0.0)?;
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
        discount *= gamma;
    }
    let terminal = (terminal * masks.get(horizon)?)?.affine(discount, 0.0)?;
    let model_steps = total.ok_or_else(|| Error::Config("empty horizon".into()))?;
    let objective = (&model_steps + &terminal)?.mean_all()?;
    let logp0 = logp0.ok_or_else(|| Error::Config("empty horizon".into()))?;
    Ok(PolicyObjective { objective, logp0, model_steps, terminal, trajectory: record })
}

/// The gradient of `J / B` with respect to the policy's parameters (in the
/// order of [`GaussianPolicy::vars`]) by the explicit adjoint recursion over
/// the recorded trajectory, the way the reference computes it:
///
/// `p_H = d/ds_H [gamma^H alive_H (min Q(s_H, pi(s_H)) - alpha log pi_H)]`,
/// `p_t = d/ds_t [gamma^t alive_t (g_r(s_t, pi(s_t)) - alpha log pi_t)
///        + p_{t+1} . g_s'(s_t, pi(s_t))]`,
///
/// with `g` the gradient model's mean, each step a separate local backward
/// pass; the parameter gradient is the sum of the local ones. It is the
/// independent check of [`policy_objective`]'s single backward.
pub fn adjoint_policy_gradient(
    policy: &GaussianPolicy,
    critic: &SacCritic,
    gradient: &dyn DynamicsModel,
    trajectory: &ImaginedTrajectory,
    gamma: f64,
    alpha: f64,
) -> Result<Vec<Tensor>> {
    let horizon = trajectory.gradient_members.len();
    let (dtype, device) = (policy.dtype(), policy.device().clone());
    let vars = policy.vars();
    let rows = trajectory.states[0].dim(0)?;
    let mut acc: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<candle_core::Result<_>>()?;
    let mut add = |grads: &candle_core::backprop::GradStore| -> Result<()> {
        for (a, v) in acc.iter_mut().zip(&vars) {
            if let Some(g) = grads.get(v.as_tensor()) {
                *a = (&*a + g)?;
            }
        }
        Ok(())
    };
    let scale = 1.0 / rows as f64;
    let discount_h = gamma.powi(horizon as i32);
    let s_h = Var::from_tensor(&trajectory.states[horizon])?;
    let a = policy.sample_with_noise(s_h.as_tensor(), &trajectory.noise[horizon])?;
    let q = critic.min_q_frozen(s_h.as_tensor(), &a.action)?;
    let m = mask_tensor(&trajectory.alive[horizon], dtype, &device)?;
    let local = ((q - (&a.logp * alpha)?)? * m)?.sum_all()?.affine(discount_h * scale, 0.0)?;
    let grads = local.backward()?;
    add(&grads)?;
    let mut p_next = match grads.get(s_h.as_tensor()) {
        Some(g) => g.detach(),
        None => s_h.as_tensor().zeros_like()?,
    };
    for t in (0..horizon).rev() {
        let s_t = Var::from_tensor(&trajectory.states[t])?;
        let a = policy.sample_with_noise(s_t.as_tensor(), &trajectory.noise[t])?;
        let g = gradient.mean(s_t.as_tensor(), &a.action, &Members::host(trajectory.gradient_members[t].clone()))?;
        let m = mask_tensor(&trajectory.alive[t], dtype, &device)?;
        let reward_part =
            ((g.reward - (&a.logp * alpha)?)? * m)?.sum_all()?.affine(gamma.powi(t as i32) * scale, 0.0)?;
        let adjoint_part = (g.next_obs * &p_next)?.sum_all()?;
        let local = (reward_part + adjoint_part)?;
        let grads = local.backward()?;
        add(&grads)?;
        p_next = match grads.get(s_t.as_tensor()) {
            Some(g) => g.detach(),
            None => s_t.as_tensor().zeros_like()?,
        };
    }
    Ok(acc)
}
