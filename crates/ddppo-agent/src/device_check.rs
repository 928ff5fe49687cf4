//! Does a device compute what the CPU computes? Each check builds the same
//! seeded networks and inputs on the CPU and on the device, runs one piece of
//! the training on both, and compares the results within a stated `f32`
//! tolerance (issue 15's agreement tests): the ensemble's forward pass, the
//! gradients of its NLL and of the gradient loss (equations 9-10), a policy
//! update's gradient through `H` model steps (equation 11), a model-env step,
//! and an Adam step (the ensembles' and the SAC networks').
//!
//! The CPU reference uses the fused CPU kernels; the device side uses the
//! plain candle-op path that non-CPU devices run. Asked for the CPU itself
//! the device side therefore still runs different code (plain ops on the
//! CPU), which is how a normal test exercises these checks without a GPU.
//!
//! The error of a check is `max |device - cpu| / (1 + max |cpu|)` over every
//! value it compares. The tolerances: `1e-4` for one forward pass or step,
//! `1e-3` for gradients (sums over a batch, and through `H = 3` model steps).

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use ddppo_models::{EnsembleConfig, LossBatch, ModelOptimizer, NeighbourBatch, ProbabilisticEnsemble, transfer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Result;
use crate::nn::{Adam, sorted_vars};
use crate::policy_update::policy_objective;
use crate::rollout::{Derivatives, ModelEnv};
use crate::sac::{GaussianPolicy, SacCritic};

/// Tolerance of a single forward pass or step.
pub const FORWARD_TOLERANCE: f64 = 1e-4;
/// Tolerance of a gradient.
pub const GRADIENT_TOLERANCE: f64 = 1e-3;

const OBS: usize = 5;
const ACT: usize = 2;
const ROWS: usize = 64;
const SEED: u64 = 2022;

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    /// What was compared.
    pub name: &'static str,
    /// [`relative_error`] of the device's values against the CPU's.
    pub error: f64,
    /// The largest error that passes.
    pub tolerance: f64,
}

impl Check {
    /// Whether the device agreed (a NaN error fails).
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.passed() { "ok" } else { "FAILED" };
        write!(f, "{:<24} error {:.2e} (tolerance {:.0e})  {verdict}", self.name, self.error, self.tolerance)
    }
}

/// The largest over the compared tensors (`b` the reference) of
/// `max |a - b| / max |b|`, where a tensor much smaller than the largest one
/// is measured against `1e-3` of that one's size instead (a gradient that is
/// almost zero on one side has no meaningful relative error). Infinite when
/// the shapes differ, NaN when a value is.
pub fn relative_error(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    if a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.len() != y.len()) {
        return f64::INFINITY;
    }
    let largest = |v: &[f64]| v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let global = b.iter().map(|y| largest(y)).fold(0.0f64, f64::max);
    let mut worst = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        let mut diff = 0.0f64;
        for (p, q) in x.iter().zip(y) {
            let d = (p - q).abs();
            if d.is_nan() {
                return f64::NAN;
            }
            diff = diff.max(d);
        }
        if diff > 0.0 {
            worst = worst.max(diff / largest(y).max(1e-3 * global));
        }
    }
    worst
}

/// Runs every check on `device` against the CPU.
pub fn agreement(device: &Device) -> Result<Vec<Check>> {
    Ok(vec![
        compare("ensemble forward", FORWARD_TOLERANCE, device, ensemble_forward)?,
        compare("ensemble NLL gradient", GRADIENT_TOLERANCE, device, |d, cpu| loss_gradient(d, cpu, false))?,
        compare("gradient-loss gradient", GRADIENT_TOLERANCE, device, |d, cpu| loss_gradient(d, cpu, true))?,
        compare("policy-update gradient", GRADIENT_TOLERANCE, device, policy_gradient)?,
        compare("model-env step", FORWARD_TOLERANCE, device, model_env_step)?,
        compare("adam step", FORWARD_TOLERANCE, device, adam_step)?,
    ])
}

/// Runs `f` on the CPU (reference: fused kernels) and on `device` (plain
/// ops) and compares what it returns.
fn compare(
    name: &'static str,
    tolerance: f64,
    device: &Device,
    f: impl Fn(&Device, bool) -> Result<Vec<Vec<f64>>>,
) -> Result<Check> {
    let reference = f(&Device::Cpu, true)?;
    let other = f(device, false)?;
    Ok(Check { name, error: relative_error(&other, &reference), tolerance })
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(transfer::download_f64(t)?)
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn tensor(data: Vec<f64>, shape: &[usize], device: &Device) -> Result<Tensor> {
    Ok(transfer::upload_f64(data, shape, DType::F32, device)?)
}

/// A seeded ensemble with a non-trivial input scaler, on `device`.
fn ensemble(device: &Device, fused: bool, rng: &mut ChaCha8Rng) -> Result<ProbabilisticEnsemble> {
    let cfg = EnsembleConfig {
        ensemble_size: 4,
        elites: 3,
        hidden: 32,
        hidden_layers: 3,
        weight_decay: vec![1e-4; 4],
        ..Default::default()
    };
    let mut e = ProbabilisticEnsemble::new(OBS, ACT, &cfg, device, DType::F32, rng)?;
    let mean = uniform(rng, OBS + ACT, 0.5);
    let std = (0..OBS + ACT).map(|_| rng.random_range(0.5..2.0)).collect();
    e.set_scaler(mean, std)?;
    e.set_fused_kernels(fused);
    Ok(e)
}

fn ensemble_forward(device: &Device, fused: bool) -> Result<Vec<Vec<f64>>> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let e = ensemble(device, fused, &mut rng)?;
    let obs = tensor(uniform(&mut rng, ROWS * OBS, 1.0), &[ROWS, OBS], device)?;
    let act = tensor(uniform(&mut rng, ROWS * ACT, 1.0), &[ROWS, ACT], device)?;
    let members: Vec<usize> = (0..ROWS).map(|i| i % 4).collect();
    let m = e.mean(&obs, &act, &members)?;
    let (s, _) = e.sample(&obs, &act, &members, &mut rng)?;
    Ok(vec![host(&m.reward)?, host(&m.next_obs)?, host(&s.reward)?, host(&s.next_obs)?])
}

/// A training minibatch of the ensemble's loss, with the gradient loss's
/// points, directions (`k = 9 > in = 7`: the Jacobian-column path) and targets.
fn loss_batch(device: &Device, rng: &mut ChaCha8Rng, gradient: bool) -> Result<LossBatch> {
    let (e, b, ind, od, k) = (4, 16, OBS + ACT, OBS + 1, 9);
    let neighbours = if gradient {
        Some(NeighbourBatch {
            points: tensor(uniform(rng, e * b * ind, 1.0), &[e, b, ind], device)?,
            directions: tensor(uniform(rng, e * b * k * ind, 0.3), &[e, b * k, ind], device)?,
            differences: tensor(uniform(rng, e * b * k * od, 0.3), &[e, b * k, od], device)?,
            k,
        })
    } else {
        None
    };
    Ok(LossBatch {
        x: tensor(uniform(rng, e * b * ind, 1.0), &[e, b, ind], device)?,
        y: tensor(uniform(rng, e * b * od, 1.0), &[e, b, od], device)?,
        neighbours,
    })
}

fn var_values(vars: &[(String, Var)], grads: &candle_core::backprop::GradStore) -> Result<Vec<Vec<f64>>> {
    vars.iter()
        .map(|(_, v)| match grads.get(v.as_tensor()) {
            Some(g) => host(g),
            None => Ok(Vec::new()),
        })
        .collect()
}

fn loss_gradient(device: &Device, fused: bool, gradient: bool) -> Result<Vec<Vec<f64>>> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let e = ensemble(device, fused, &mut rng)?;
    let batch = loss_batch(device, &mut rng, gradient)?;
    let terms = e.loss(&batch, 1.0)?;
    // The gradient loss's own gradient: in the total the NLL's would swamp it.
    let grads = match &terms.derivative_loss {
        Some(r) => r.sum_all()?.backward()?,
        None => terms.total.backward()?,
    };
    let mut out = var_values(&sorted_vars(e.varmap()), &grads)?;
    out.push(host(&terms.nll)?);
    if let Some(r) = &terms.derivative_loss {
        out.push(host(r)?);
    }
    Ok(out)
}

fn policy_gradient(device: &Device, fused: bool) -> Result<Vec<Vec<f64>>> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let prediction = ensemble(device, fused, &mut rng)?;
    let gradient = ensemble(device, fused, &mut rng)?;
    let policy = GaussianPolicy::new(OBS, &[-1.0, -2.0], &[1.0, 2.0], &[32, 32], DType::F32, device, &mut rng)?;
    let critic = SacCritic::new(OBS, ACT, &[32, 32], DType::F32, device, &mut rng)?;
    let start = tensor(uniform(&mut rng, ROWS * OBS, 1.0), &[ROWS, OBS], device)?;
    // Some rows terminate inside the horizon, so the masks matter too.
    let env = ModelEnv::new(
        Box::new(&prediction),
        Derivatives::Separate(Box::new(&gradient)),
        Box::new(|s: &[f32]| s[0].abs() > 1.2),
    );
    let out = policy_objective(&policy, &critic, &env, &start, 3, 0.99, 0.2, &mut rng)?;
    let grads = out.objective.backward()?;
    let mut values = var_values(&sorted_vars(policy.varmap()), &grads)?;
    values.push(host(&out.objective)?);
    values.extend(out.trajectory.alive.iter().cloned());
    Ok(values)
}

fn model_env_step(device: &Device, fused: bool) -> Result<Vec<Vec<f64>>> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let model = ensemble(device, fused, &mut rng)?;
    let policy = GaussianPolicy::new(OBS, &[-1.0, -2.0], &[1.0, 2.0], &[32, 32], DType::F32, device, &mut rng)?;
    let env = ModelEnv::new(Box::new(&model), Derivatives::None, Box::new(|s: &[f32]| s[0].abs() > 1.2));
    let obs = tensor(uniform(&mut rng, ROWS * OBS, 1.0), &[ROWS, OBS], device)?;
    let act = policy.sample(&obs, &mut rng)?.action;
    let step = env.step_values(&obs, &act, &mut rng)?;
    let done = env.terminations(&step.next_obs)?;
    Ok(vec![
        host(&act)?,
        host(&step.reward)?,
        host(&step.next_obs)?,
        done.iter().map(|&d| f64::from(u8::from(d))).collect(),
    ])
}

/// One Adam step of each optimiser on the gradient of `sum(p * c)` (exactly
/// `c`, the same on every device), so that only the update rule is compared:
/// the change of every parameter in units of the learning rate (about ±1).
fn adam_step(device: &Device, fused: bool) -> Result<Vec<Vec<f64>>> {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED);
    let e = ensemble(device, fused, &mut rng)?;
    let policy = GaussianPolicy::new(OBS, &[-1.0, -2.0], &[1.0, 2.0], &[32, 32], DType::F32, device, &mut rng)?;
    let linear = |vm: &VarMap, rng: &mut ChaCha8Rng| -> Result<Tensor> {
        let mut total = Tensor::zeros((), DType::F32, device)?;
        for (_, v) in sorted_vars(vm) {
            let c = tensor(uniform(rng, v.elem_count(), 1.0), v.dims(), device)?;
            total = (total + (v.as_tensor() * c)?.sum_all()?)?;
        }
        Ok(total)
    };
    let values = |vm: &VarMap| -> Result<Vec<Vec<f64>>> { sorted_vars(vm).iter().map(|(_, v)| host(v)).collect() };
    let (model_before, policy_before) = (values(e.varmap())?, values(policy.varmap())?);
    let mut model_opt = ModelOptimizer::new(&e)?;
    model_opt.set_fused(fused);
    let grads = linear(e.varmap(), &mut rng)?.backward()?;
    model_opt.update(&grads)?;
    let policy_lr = 3e-4;
    let mut policy_opt = Adam::new(policy.vars(), policy_lr, Some(0.5))?;
    policy_opt.backward_step(&linear(policy.varmap(), &mut rng)?)?;
    let steps = |after: Vec<Vec<f64>>, before: Vec<Vec<f64>>, lr: f64| -> Vec<Vec<f64>> {
        after.iter().zip(&before).map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y) / lr).collect()).collect()
    };
    let mut out = steps(values(e.varmap())?, model_before, e.config().lr);
    out.extend(steps(values(policy.varmap())?, policy_before, policy_lr));
    Ok(out)
}
