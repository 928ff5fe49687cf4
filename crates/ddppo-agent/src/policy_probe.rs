//! Policy diagnostics at every evaluation: what drives the policy update and
//! whether the learned reward prices the policy's actions right.
//!
//! Built to run down a collapse seen on Ant (evaluation return from 756 to
//! -1,166 within 2,000 env steps, paid in saturated actions). At each
//! evaluation, on [`PROBE_ROWS`] start states drawn from `D_env` (the
//! distribution the policy update starts from) with a random stream of its
//! own (so nothing the training uses is read or changed):
//! - the pre-squash Gaussian's mean `|mu|` and mean standard deviation;
//! - the norm of the gradient of the policy objective `J` with respect to
//!   the policy's parameters, split into its parts: for the back-propagated
//!   update (equation 11) the model rewards `sum_{t<H} gamma^t alive_t r_t`,
//!   the terminal value `gamma^H alive_H min Q`, and every entropy term
//!   together; for the SAC update `min Q` and the entropy term (no reward
//!   part). The parts are taken on the same draws as each other, before the
//!   update's clipping, and add up to the update's gradient;
//! - the action cost as the reward sees it, `r(s, c) - r(s, pi(s))` with
//!   `pi(s)` the deterministic action and `c` the centre of the action box
//!   (0 on every task here), true (one env step from the state each
//!   observation stands for, [`ddppo_env::StepJacobian::step_at`]) and as the
//!   elites of each ensemble predict it (mean over elites), with the
//!   ensembles' mean absolute reward errors at `(s, pi(s))`.
//!
//! - the critic's calibration: `min Q(s, pi(s))` against the discounted
//!   return the deterministic policy gets in the true env from the same
//!   states (a critic far above it overvalues where the policy goes).
//!
//! The evaluation policy's mean `|a|` comes with the evaluation episodes
//! ([`crate::EvalSummary::action_abs_mean`]).
use candle_core::{DType, Tensor, Var};
use ddppo_buffer::Batch;
use ddppo_env::make_jacobian;
use ddppo_models::ProbabilisticEnsemble;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::policy_update::policy_objective;
use crate::variant::PolicyUpdate;
use crate::{Agent, Error, Result};

/// Start states per probe.
pub const PROBE_ROWS: usize = 256;
/// The random stream of the probe (the agent's are 0-4, the Jacobian probe's 5).
const PROBE_STREAM: u64 = 6;

/// One evaluation's policy diagnostics (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PolicyProbe {
    /// Mean `|mu|` of the pre-squash Gaussian.
    pub mu_abs: f64,
    /// Mean standard deviation of the pre-squash Gaussian.
    pub std: f64,
    /// `|d J_reward / d phi|`: the model rewards' part (back-propagated update only).
    pub grad_norm_reward: Option<f64>,
    /// `|d J_Q / d phi|`: the critic's part (terminal value, or SAC's `min Q`);
    /// `None` for the back-propagated update before the first model training.
    pub grad_norm_q: Option<f64>,
    /// `|d J_entropy / d phi|`: the `-alpha log pi` terms (`None` as `grad_norm_q`).
    pub grad_norm_entropy: Option<f64>,
    /// Mean true `r(s, c) - r(s, pi(s))`; `None` before the first model training.
    pub action_cost_true: Option<f64>,
    /// The rollout ensemble's elites' prediction of it.
    pub action_cost_pred: Option<f64>,
    /// The differentiating ensemble's (the rollout ensemble's own without a separate one).
    pub action_cost_grad: Option<f64>,
    /// Mean `|r_model(s, pi(s)) - r(s, pi(s))|` of the rollout ensemble's elites.
    pub reward_error_pred: Option<f64>,
    /// The same for the differentiating ensemble's elites.
    pub reward_error_grad: Option<f64>,
    /// Mean `min Q(s, pi(s))` of the critic at the first [`CALIBRATION_STATES`]
    /// probe states, `pi(s)` the deterministic action; `None` before the first critic update.
    pub critic_q: Option<f64>,
    /// Mean discounted return of the deterministic policy over at most
    /// [`CALIBRATION_STEPS`] true env steps from the same states (each step
    /// from the state its observation stands for; cut at the task's termination).
    pub policy_return: Option<f64>,
}

/// Start states of the critic's calibration figures.
pub const CALIBRATION_STATES: usize = 32;
/// True env steps per calibration rollout (`0.99^300 = 0.05` of the tail is left out).
pub const CALIBRATION_STEPS: usize = 300;

/// `sqrt(sum |d f / d v|^2)` over `vars` of a scalar `f`.
fn grad_norm(f: &Tensor, vars: &[Var]) -> Result<f64> {
    let grads = f.backward()?;
    let mut sq = 0.0;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
        }
    }
    Ok(sq.sqrt())
}

/// The per-row mean reward at `(obs, act)` of each of `ens`'s elites, one `rows`-long vector per elite.
fn elite_rewards(ens: &ProbabilisticEnsemble, obs: &Tensor, act: &Tensor) -> Result<Vec<Vec<f64>>> {
    let rows = obs.dim(0)?;
    ens.elites()
        .iter()
        .map(|&e| Ok(ens.mean(obs, act, &vec![e; rows])?.reward.to_dtype(DType::F64)?.to_vec1::<f64>()?))
        .collect()
}

/// `(mean over elites and rows of r(s, c) - r(s, a), mean |r(s, a) - truth|)` on the rows of
/// `truth`, each `(row, true r(s, a), true r(s, c))`.
fn model_action_cost(
    ens: &ProbabilisticEnsemble,
    obs: &Tensor,
    act: &Tensor,
    centre: &Tensor,
    truth: &[(usize, f64, f64)],
) -> Result<(f64, f64)> {
    let at_a = elite_rewards(ens, obs, act)?;
    let at_c = elite_rewards(ens, obs, centre)?;
    let (mut cost, mut err) = (0.0, 0.0);
    for (ra, rc) in at_a.iter().zip(&at_c) {
        for &(i, r_a, _) in truth {
            cost += rc[i] - ra[i];
            err += (ra[i] - r_a).abs();
        }
    }
    let n = (at_a.len() * truth.len()).max(1) as f64;
    Ok((cost / n, err / n))
}

impl Agent {
    /// This evaluation's policy diagnostics, `None` while `D_env` is empty.
    /// Reads no random stream of the run and changes nothing the training
    /// uses (a test checks a run with extra probes trains identically).
    pub fn policy_probe(&mut self) -> Result<Option<PolicyProbe>> {
        if self.env_buffer.is_empty() {
            return Ok(None);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed ^ (self.run.env_steps as u64).rotate_left(32));
        rng.set_stream(PROBE_STREAM);
        let (od, ad) = (self.env_buffer.obs_dim(), self.env_buffer.act_dim());
        let rows = PROBE_ROWS.min(self.env_buffer.len());
        let mut batch = Batch::new(rows, od, ad);
        self.env_buffer.try_sample_into(&mut rng, &mut batch)?;
        self.policy_probe_at(&batch.obs, &mut rng).map(Some)
    }

    /// The figures of [`Agent::policy_probe`] at given start states
    /// (row-major, `rows x obs_dim`), the policy update's draws from `rng`.
    pub fn policy_probe_at(&self, states: &[f32], rng: &mut ChaCha8Rng) -> Result<PolicyProbe> {
        let (od, ad) = (self.env_buffer.obs_dim(), self.env_buffer.act_dim());
        let rows = states.len() / od.max(1);
        if rows == 0 || rows * od != states.len() {
            return Err(Error::Config(format!("probe states: {} values are not rows of {od}", states.len())));
        }
        let obs = Tensor::from_slice(states, (rows, od), &self.device)?;
        // The states for the true env steps.
        let states64: Vec<Vec<f64>> = states.chunks(od).map(|r| r.iter().map(|&x| x as f64).collect()).collect();
        let (mu, log_std) = self.policy.distribution(&obs)?;
        let mean = |t: Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?) };
        let mut probe = PolicyProbe { mu_abs: mean(mu.abs()?)?, std: mean(log_std.exp()?)?, ..Default::default() };

        let alpha = self.temperature.alpha()?;
        let vars = self.policy.vars();
        let trained = self.run.model_trainings > 0;
        match self.cfg.variant.spec().policy_update {
            PolicyUpdate::ThroughModel if trained => {
                let env =
                    self.model_env()?.ok_or_else(|| Error::Config("back-prop policy probe without a model".into()))?;
                let (h, gamma) = (self.cfg.horizon, self.cfg.gamma);
                // The same draws twice: with the update's alpha, and with none (rewards and Q alone).
                let full = policy_objective(&self.policy, &self.critic, &env, &obs, h, gamma, alpha, &mut rng.clone())?;
                let bare = policy_objective(&self.policy, &self.critic, &env, &obs, h, gamma, 0.0, rng)?;
                probe.grad_norm_reward = Some(grad_norm(&bare.model_steps.mean_all()?, &vars)?);
                probe.grad_norm_q = Some(grad_norm(&bare.terminal.mean_all()?, &vars)?);
                probe.grad_norm_entropy = Some(grad_norm(&(full.objective - bare.objective)?, &vars)?);
            }
            PolicyUpdate::ThroughModel => {}
            PolicyUpdate::Sac => {
                let sample = self.policy.sample(&obs, rng)?;
                let q = self.critic.min_q_frozen(&obs, &sample.action)?;
                probe.grad_norm_q = Some(grad_norm(&q.mean_all()?, &vars)?);
                probe.grad_norm_entropy = Some(grad_norm(&sample.logp.mean_all()?.affine(-alpha, 0.0)?, &vars)?);
            }
        }

        let act = self.policy.mean_action(&obs)?;
        let mut truth_env = make_jacobian(self.task)?;
        if self.run.critic_updates > 0 {
            let n = rows.min(CALIBRATION_STATES);
            let q = self.critic.min_q_frozen(&obs.narrow(0, 0, n)?, &act.narrow(0, 0, n)?)?;
            probe.critic_q = Some(mean(q)?);
            let snap = self.policy.snapshot()?;
            let mut total = 0.0;
            for start in &states64[..n] {
                let mut s = start.clone();
                let (mut ret, mut discount) = (0.0, 1.0);
                for _ in 0..CALIBRATION_STEPS {
                    // A state the simulator rejects ends the rollout there.
                    let Ok((r, next)) = truth_env.step_at(&s, &snap.mean_action(&s)) else { break };
                    ret += discount * r;
                    discount *= self.cfg.gamma;
                    let next32: Vec<f32> = next.iter().map(|&x| x as f32).collect();
                    if ddppo_env::is_terminal(self.task, &next32) {
                        break;
                    }
                    s = next;
                }
                total += ret;
            }
            probe.policy_return = Some(total / n as f64);
        }

        let Some(models) = self.models.as_ref().filter(|_| trained) else {
            return Ok(probe);
        };
        let (low, high) = (self.env.action_low().to_vec(), self.env.action_high().to_vec());
        let centre_row: Vec<f64> = low.iter().zip(&high).map(|(l, h)| 0.5 * (l + h)).collect();
        let centre = Tensor::from_slice(&centre_row.repeat(rows), (rows, ad), &self.device)?.to_dtype(DType::F32)?;
        let act_host = act.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        // (row, r(s, a), r(s, c)) of the rows whose two true steps ran (a
        // state the simulator rejects is left out, not the run stopped).
        let mut truth = Vec::with_capacity(rows);
        for (i, s) in states64.iter().enumerate() {
            let a = &act_host[i * ad..(i + 1) * ad];
            if let (Ok((r_a, _)), Ok((r_c, _))) = (truth_env.step_at(s, a), truth_env.step_at(s, &centre_row)) {
                truth.push((i, r_a, r_c));
            }
        }
        if truth.is_empty() {
            return Ok(probe);
        }
        probe.action_cost_true = Some(truth.iter().map(|(_, a, c)| c - a).sum::<f64>() / truth.len() as f64);
        let (cost, err) = model_action_cost(models.prediction.ensemble(), &obs, &act, &centre, &truth)?;
        probe.action_cost_pred = Some(cost);
        probe.reward_error_pred = Some(err);
        let (cost_g, err_g) = match &models.gradient {
            Some(g) => model_action_cost(g.ensemble(), &obs, &act, &centre, &truth)?,
            None => (cost, err),
        };
        probe.action_cost_grad = Some(cost_g);
        probe.reward_error_grad = Some(err_g);
        Ok(probe)
    }
}
