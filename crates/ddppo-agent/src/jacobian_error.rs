//! Live Jacobian-error diagnostics: the paper's Figure 2 measured during
//! training on every task. The mechanism DDPPO rests on is that the gradient
//! ensemble's derivatives `d(r, s')/d(s, a)` are closer to the true ones than
//! the prediction ensemble's; this module measures that at every evaluation.
//!
//! A [`JacobianProbe`] is drawn once per run: `jacobian_states` transitions
//! of a uniformly random policy on envs of the task seeded from a random
//! stream of its own (so the models never train on them and the run's other
//! streams are untouched), their true step Jacobians
//! ([`ddppo_env::StepJacobian`]: exact for the analytic envs, central
//! differences through the MuJoCo step), and `jacobian_directions` random
//! unit directions per state. It is kept in the checkpoint.
//!
//! [`JacobianProbe::errors`] compares an ensemble's elite members with the
//! truth, averaged over the elites (the policy update differentiates one
//! elite per row):
//! - the Jacobian MSE of the reward row and of the dynamics rows, raw units;
//! - the mean cosine similarity between `J_model v` and `J_true v` over the
//!   states and directions, where `J` is the Jacobian of the increment
//!   `(r, s' - s)`: both Jacobians hold the identity block of `s' = s + ...`
//!   exactly, and leaving it in would push every cosine towards 1. The MSE is
//!   dominated by a few stiff contact states; the cosine weighs each state
//!   and direction alike.
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ddppo_env::{EnvFactory, Task, make_jacobian};
use ddppo_models::ProbabilisticEnsemble;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::{Error, Result};

/// The random stream of the probe (the agent's streams are 0-4).
const PROBE_STREAM: u64 = 5;
/// Random-policy steps per kept state: consecutive states are near copies.
const KEEP_EVERY: usize = 10;

/// One ensemble's error figures, averaged over its elites.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JacobianErrors {
    /// Mean squared error of the reward row `d r / d(s, a)`.
    pub mse_reward: f64,
    /// Mean squared error of the dynamics rows `d s' / d(s, a)`.
    pub mse_dynamics: f64,
    /// Mean cosine similarity of `J_model v` and `J_true v` (increments; see the module docs).
    pub cos: f64,
    /// Mean squared error of the reward row's action columns `d r / d a`
    /// alone (the derivative of the action cost the policy update feels).
    pub mse_reward_action: f64,
    /// Mean over states of the cosine between the model's and the true
    /// `d r / d a` (states where either is zero are left out).
    pub cos_reward_action: f64,
}

/// The fixed held-out states with their true Jacobians and directions.
#[derive(Clone, Debug, PartialEq)]
pub struct JacobianProbe {
    obs_dim: usize,
    act_dim: usize,
    /// `N x obs_dim`.
    obs: Vec<f64>,
    /// `N x act_dim`.
    act: Vec<f64>,
    /// `N x (1 + obs_dim) x (obs_dim + act_dim)`.
    jac: Vec<f64>,
    /// `N x k x (obs_dim + act_dim)`, unit length.
    dirs: Vec<f64>,
}

impl JacobianProbe {
    /// Draws `states` states and actions of a uniform random policy on the
    /// task (episodes from `factory`, keeping every tenth step), computes
    /// their true Jacobians on `workers` threads and draws `directions` unit
    /// directions per state; everything from `seed`'s stream 5.
    pub fn draw(
        task: Task,
        factory: &EnvFactory,
        states: usize,
        directions: usize,
        seed: u64,
        workers: usize,
    ) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(PROBE_STREAM);
        let mut env = factory.make()?;
        let (d, m) = (env.obs_dim(), env.act_dim());
        let (low, high) = (env.action_low().to_vec(), env.action_high().to_vec());
        let (mut obs, mut act) = (Vec::with_capacity(states * d), Vec::with_capacity(states * m));
        let mut s = env.reset(rng.random());
        let mut t = 0usize;
        while obs.len() < states * d {
            let a: Vec<f64> = low.iter().zip(&high).map(|(l, h)| rng.random_range(*l..*h)).collect();
            if t.is_multiple_of(KEEP_EVERY) {
                obs.extend_from_slice(&s);
                act.extend_from_slice(&a);
            }
            t += 1;
            let step = env.step(&a)?;
            s = if step.terminated || step.truncated { env.reset(rng.random()) } else { step.obs };
        }
        let cols = d + m;
        let mut dirs = Vec::with_capacity(states * directions * cols);
        for _ in 0..states * directions {
            let v: Vec<f64> = (0..cols).map(|_| rng.sample(StandardNormal)).collect();
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
            dirs.extend(v.iter().map(|x| x / norm));
        }
        let jac = true_jacobians(task, &obs, &act, d, m, workers)?;
        Ok(Self { obs_dim: d, act_dim: m, obs, act, jac, dirs })
    }

    /// The number of states.
    pub fn len(&self) -> usize {
        self.obs.len() / self.obs_dim.max(1)
    }

    /// Whether the probe holds no state.
    pub fn is_empty(&self) -> bool {
        self.obs.is_empty()
    }

    /// The error figures of `ens`'s elites against the true Jacobians.
    pub fn errors(&self, ens: &ProbabilisticEnsemble) -> Result<JacobianErrors> {
        let n = self.len();
        let dev = ens.device();
        let upload = |x: &[f64], cols: usize| -> Result<Tensor> {
            Ok(Tensor::from_slice(x, (n, cols), dev)?.to_dtype(ens.dtype())?)
        };
        let (obs, act) = (upload(&self.obs, self.obs_dim)?, upload(&self.act, self.act_dim)?);
        let elites = ens.elites();
        let mut sum = JacobianErrors {
            mse_reward: 0.0,
            mse_dynamics: 0.0,
            cos: 0.0,
            mse_reward_action: 0.0,
            cos_reward_action: 0.0,
        };
        for &member in elites {
            let model = ens.jacobian(&obs, &act, member)?.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let e = jacobian_errors(&model, &self.jac, &self.dirs, self.obs_dim, self.act_dim);
            sum.mse_reward += e.mse_reward;
            sum.mse_dynamics += e.mse_dynamics;
            sum.cos += e.cos;
            sum.mse_reward_action += e.mse_reward_action;
            sum.cos_reward_action += e.cos_reward_action;
        }
        let k = elites.len().max(1) as f64;
        Ok(JacobianErrors {
            mse_reward: sum.mse_reward / k,
            mse_dynamics: sum.mse_dynamics / k,
            cos: sum.cos / k,
            mse_reward_action: sum.mse_reward_action / k,
            cos_reward_action: sum.cos_reward_action / k,
        })
    }

    /// Writes the probe as safetensors (`f64` tensors `obs`, `act`, `jacobian`, `directions`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let (n, d, m) = (self.len(), self.obs_dim, self.act_dim);
        let k = self.dirs.len() / (n * (d + m)).max(1);
        let dev = Device::Cpu;
        let map = std::collections::HashMap::from([
            ("obs".to_string(), Tensor::from_slice(&self.obs, (n, d), &dev)?),
            ("act".to_string(), Tensor::from_slice(&self.act, (n, m), &dev)?),
            ("jacobian".to_string(), Tensor::from_slice(&self.jac, (n, 1 + d, d + m), &dev)?),
            ("directions".to_string(), Tensor::from_slice(&self.dirs, (n, k, d + m), &dev)?),
        ]);
        candle_core::safetensors::save(&map, path).map_err(|e| probe_error(path, e.to_string()))
    }

    /// Reads a probe written by [`JacobianProbe::save`] for a task with
    /// `obs_dim`, `act_dim`; shapes are checked.
    pub fn load(path: &Path, obs_dim: usize, act_dim: usize) -> Result<Self> {
        let map = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| probe_error(path, e.to_string()))?;
        let get = |name: &str, dims: usize| -> Result<(Vec<usize>, Vec<f64>)> {
            let t = map.get(name).ok_or_else(|| probe_error(path, format!("no tensor `{name}`")))?;
            if t.dims().len() != dims || t.dtype() != DType::F64 {
                return Err(probe_error(path, format!("tensor `{name}` is {:?} {:?}", t.dtype(), t.dims())));
            }
            Ok((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f64>()?))
        };
        let (so, obs) = get("obs", 2)?;
        let (sa, act) = get("act", 2)?;
        let (sj, jac) = get("jacobian", 3)?;
        let (sd, dirs) = get("directions", 3)?;
        let n = so[0];
        let (d, m) = (obs_dim, act_dim);
        if so != [n, d] || sa != [n, m] || sj != [n, 1 + d, d + m] || sd[0] != n || sd[2] != d + m {
            return Err(probe_error(path, format!("shapes {so:?} {sa:?} {sj:?} {sd:?} do not fit obs {d}, act {m}")));
        }
        Ok(Self { obs_dim: d, act_dim: m, obs, act, jac, dirs })
    }
}

impl crate::Agent {
    /// This evaluation's figures `(rollout ensemble, differentiating
    /// ensemble)`; `None` without models, before their first training, or
    /// with `jacobian_states = 0`. Draws the probe on first use. Reads no
    /// random stream of the run and changes nothing the training uses.
    pub(crate) fn jacobian_errors(&mut self) -> Result<(Option<JacobianErrors>, Option<JacobianErrors>)> {
        if self.cfg.jacobian_states == 0 || self.models.is_none() || self.run.model_trainings == 0 {
            return Ok((None, None));
        }
        if self.jacobian_probe.is_none() {
            let cfg = &self.cfg;
            self.jacobian_probe = Some(JacobianProbe::draw(
                self.task,
                &self.factory,
                cfg.jacobian_states,
                cfg.jacobian_directions,
                cfg.seed,
                cfg.eval_workers,
            )?);
        }
        let (Some(probe), Some(models)) = (&self.jacobian_probe, &self.models) else {
            return Ok((None, None));
        };
        let pred = probe.errors(models.prediction.ensemble())?;
        let grad = match &models.gradient {
            Some(g) => probe.errors(g.ensemble())?,
            None => pred,
        };
        Ok((Some(pred), Some(grad)))
    }
}

fn probe_error(path: &Path, reason: String) -> Error {
    Error::Checkpoint { path: path.display().to_string(), reason }
}

/// The true Jacobians of `N` points, split over `workers` threads (each with
/// its own simulator); the result does not depend on the split.
fn true_jacobians(task: Task, obs: &[f64], act: &[f64], d: usize, m: usize, workers: usize) -> Result<Vec<f64>> {
    let n = obs.len() / d;
    let per = n.div_ceil(workers.max(1)).max(1);
    let chunks: Vec<Result<Vec<f64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|start| {
                let end = (start + per).min(n);
                scope.spawn(move || -> Result<Vec<f64>> {
                    let mut jac = make_jacobian(task)?;
                    let mut out = Vec::new();
                    for i in start..end {
                        out.extend(jac.step_jacobian(&obs[i * d..(i + 1) * d], &act[i * m..(i + 1) * m])?);
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::Diverged("a true-Jacobian worker panicked".into()))))
            .collect()
    });
    let mut all = Vec::with_capacity(n * (1 + d) * (d + m));
    for c in chunks {
        all.extend(c?);
    }
    Ok(all)
}

/// The error figures of one model Jacobian set against the true one (both
/// `N x (1 + d) x (d + m)` row-major; `dirs` is `N x k x (d + m)`).
pub fn jacobian_errors(model: &[f64], truth: &[f64], dirs: &[f64], d: usize, m: usize) -> JacobianErrors {
    let (rows, cols) = (1 + d, d + m);
    let n = truth.len() / (rows * cols);
    let k = dirs.len() / (n * cols).max(1);
    let (mut reward, mut dynamics) = (0.0, 0.0);
    for (i, (a, b)) in model.iter().zip(truth).enumerate() {
        let se = (a - b).powi(2);
        if (i / cols).is_multiple_of(rows) {
            reward += se;
        } else {
            dynamics += se;
        }
    }
    // J v of the increment (r, s' - s): the identity block is taken out.
    let increment_jvp = |jac: &[f64], v: &[f64]| -> Vec<f64> {
        (0..rows)
            .map(|r| {
                let dot: f64 = jac[r * cols..(r + 1) * cols].iter().zip(v).map(|(x, y)| x * y).sum();
                if r == 0 { dot } else { dot - v[r - 1] }
            })
            .collect()
    };
    // The reward row's action columns, state by state.
    let (mut action_se, mut action_cos) = (0.0, Vec::with_capacity(n));
    for p in 0..n {
        let (gm, gt) =
            (&model[p * rows * cols + d..p * rows * cols + cols], &truth[p * rows * cols + d..p * rows * cols + cols]);
        action_se += gm.iter().zip(gt).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
        action_cos.extend(cosine(gm, gt));
    }
    let mut cos = Vec::with_capacity(n * k);
    for p in 0..n {
        let (jm, jt) = (&model[p * rows * cols..(p + 1) * rows * cols], &truth[p * rows * cols..(p + 1) * rows * cols]);
        for v in dirs[p * k * cols..(p + 1) * k * cols].chunks(cols) {
            cos.extend(cosine(&increment_jvp(jm, v), &increment_jvp(jt, v)));
        }
    }
    JacobianErrors {
        mse_reward: reward / (n * cols).max(1) as f64,
        mse_dynamics: dynamics / (n * d * cols).max(1) as f64,
        cos: mean_or_nan(&cos),
        mse_reward_action: action_se / (n * m).max(1) as f64,
        cos_reward_action: mean_or_nan(&action_cos),
    }
}

/// The cosine of `u` and `v`; `None` when either is zero (no direction to compare).
fn cosine(u: &[f64], v: &[f64]) -> Option<f64> {
    let norm = |w: &[f64]| w.iter().map(|x| x * x).sum::<f64>().sqrt();
    let (nu, nv) = (norm(u), norm(v));
    (nu > 0.0 && nv > 0.0).then(|| u.iter().zip(v).map(|(x, y)| x * y).sum::<f64>() / (nu * nv))
}

/// The mean of `xs`, NaN when there are none.
fn mean_or_nan(xs: &[f64]) -> f64 {
    if xs.is_empty() { f64::NAN } else { xs.iter().sum::<f64>() / xs.len() as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One state, d = 2, m = 1: the truth and two directions.
    fn setup() -> (Vec<f64>, Vec<f64>) {
        #[rustfmt::skip]
        let truth = vec![
            0.5, -1.0, 2.0,   // d r
            1.1, 0.2, 0.3,    // d s'_1
            -0.4, 0.9, 1.5,   // d s'_2
        ];
        let s = 1.0 / 3f64.sqrt();
        (truth, vec![1.0, 0.0, 0.0, s, s, s])
    }

    #[test]
    fn exact_model_has_zero_error_and_cosine_one() {
        let (truth, dirs) = setup();
        let e = jacobian_errors(&truth, &truth, &dirs, 2, 1);
        assert_eq!((e.mse_reward, e.mse_dynamics), (0.0, 0.0));
        assert!((e.cos - 1.0).abs() < 1e-15);
    }

    #[test]
    fn mse_splits_reward_and_dynamics_rows() {
        let (truth, dirs) = setup();
        let mut model = truth.clone();
        model[1] += 0.3; // reward row: one of 3 entries off by 0.3
        model[7] -= 2.0; // dynamics: one of 6 entries off by 2
        let e = jacobian_errors(&model, &truth, &dirs, 2, 1);
        assert!((e.mse_reward - 0.09 / 3.0).abs() < 1e-15);
        assert!((e.mse_dynamics - 4.0 / 6.0).abs() < 1e-15);
        // The error is in d r / d s_2, not in d r / d a.
        assert_eq!(e.mse_reward_action, 0.0);
    }

    #[test]
    fn reward_action_columns_by_hand() {
        // Two states, d = 1, m = 2: rows (r, s'), columns (s, a_1, a_2).
        #[rustfmt::skip]
        let truth = vec![
            9.0, 1.0, 0.0,   0.0, 0.0, 0.0,
            9.0, 3.0, 4.0,   0.0, 0.0, 0.0,
        ];
        let mut model = truth.clone();
        model[1] = 0.0; // state 0: d r / d a = (0, 1) against (1, 0): cosine 0, error 1 + 1
        model[2] = 1.0;
        model[0] = -50.0; // d r / d s is not an action column
        model[7] = -3.0; // state 1: (-3, 4) against (3, 4): cosine 7 / 25, error 36
        let e = jacobian_errors(&model, &truth, &[1.0, 0.0, 0.0, 1.0, 0.0, 0.0], 1, 2);
        assert!((e.mse_reward_action - 38.0 / 4.0).abs() < 1e-12, "{}", e.mse_reward_action);
        assert!((e.cos_reward_action - (0.0 + 7.0 / 25.0) / 2.0).abs() < 1e-12, "{}", e.cos_reward_action);
    }

    #[test]
    fn cosine_is_of_the_increments() {
        let (truth, dirs) = setup();
        // Increment Jacobian G = J - [0; I 0]; a model with increment -G has
        // cosine -1 on every direction, though J_model v and J_true v share
        // the identity part.
        let mut model = truth.clone();
        for r in 0..3 {
            for c in 0..3 {
                let eye = if r >= 1 && c == r - 1 { 1.0 } else { 0.0 };
                model[r * 3 + c] = eye - (truth[r * 3 + c] - eye);
            }
        }
        let e = jacobian_errors(&model, &truth, &dirs, 2, 1);
        assert!((e.cos + 1.0).abs() < 1e-12, "{}", e.cos);
        // By hand on direction e_1: G e_1 = (0.5, 0.1, -0.4); a model whose
        // G' e_1 = (0.5, 0.1, 0.4) has cosine (0.25 + 0.01 - 0.16) / 0.42.
        let mut model = truth.clone();
        model[6] = 0.4;
        let e = jacobian_errors(&model, &truth, &dirs[..3], 2, 1);
        assert!((e.cos - 0.10 / 0.42).abs() < 1e-12, "{}", e.cos);
    }
}
