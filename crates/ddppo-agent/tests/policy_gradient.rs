//! The policy gradient of equation 11 (ALGORITHM.md section 4) against
//! independent computations: the explicit adjoint recursion on random small
//! networks, and central finite differences of a host-side evaluation of `J`
//! with the true linear dynamics as both models.

#![allow(clippy::too_many_arguments, clippy::needless_range_loop, clippy::type_complexity)]

use std::collections::HashMap;

use candle_core::{D, DType, Device, Tensor};
use ddppo_agent::policy_update::{adjoint_policy_gradient, policy_objective};
use ddppo_agent::rollout::{Derivatives, DynamicsModel, Members, ModelEnv, Prediction};
use ddppo_agent::sac::{GaussianPolicy, SacCritic};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const OBS: usize = 3;
const ACT: usize = 2;

/// An ensemble of random tanh networks `(s, a) -> (r, s + ds)` with Gaussian
/// sampling noise: a stand-in for a learned model.
struct RandomEnsemble {
    members: Vec<(Tensor, Tensor, Tensor, Tensor)>,
    noise: f64,
}

impl RandomEnsemble {
    fn new(n: usize, rng: &mut ChaCha8Rng, noise: f64) -> Self {
        let d = Device::Cpu;
        let mut w = |r: usize, c: usize, s: f64| {
            let v: Vec<f64> = (0..r * c).map(|_| rng.random_range(-s..s)).collect();
            Tensor::from_vec(v, (r, c), &d).unwrap()
        };
        let members =
            (0..n).map(|_| (w(OBS + ACT, 6, 0.8), w(1, 6, 0.3), w(6, OBS + 1, 0.5), w(1, OBS + 1, 0.2))).collect();
        Self { members, noise }
    }
    fn member_out(&self, m: usize, obs: &Tensor, act: &Tensor) -> Tensor {
        let (w1, b1, w2, b2) = &self.members[m];
        let x = Tensor::cat(&[obs, act], 1).unwrap();
        x.matmul(w1).unwrap().broadcast_add(b1).unwrap().tanh().unwrap().matmul(w2).unwrap().broadcast_add(b2).unwrap()
    }
    fn select(&self, obs: &Tensor, act: &Tensor, members: &[usize]) -> Tensor {
        let mut out: Option<Tensor> = None;
        for m in 0..self.members.len() {
            let onehot: Vec<f64> = members.iter().map(|&k| if k == m { 1.0 } else { 0.0 }).collect();
            let oh = Tensor::from_vec(onehot, (members.len(), 1), &Device::Cpu).unwrap();
            let term = self.member_out(m, obs, act).broadcast_mul(&oh).unwrap();
            out = Some(match out {
                None => term,
                Some(o) => (o + term).unwrap(),
            });
        }
        out.unwrap()
    }
    fn split(out: Tensor, obs: &Tensor) -> Prediction {
        Prediction {
            reward: out.narrow(D::Minus1, 0, 1).unwrap().squeeze(1).unwrap(),
            next_obs: (obs + out.narrow(D::Minus1, 1, OBS).unwrap()).unwrap(),
        }
    }
}

impl DynamicsModel for RandomEnsemble {
    fn draw_members(&self, rows: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
        (0..rows).map(|_| rng.random_range(0..self.members.len())).collect()
    }
    fn noise_width(&self) -> usize {
        OBS + 1
    }
    fn sample(
        &self,
        obs: &Tensor,
        act: &Tensor,
        members: &Members,
        noise: Option<&Tensor>,
    ) -> ddppo_agent::Result<Prediction> {
        let out = self.select(obs, act, &members.rows);
        let out = (out + noise.unwrap().affine(self.noise, 0.0).unwrap()).unwrap();
        Ok(Self::split(out, obs))
    }
    fn mean(&self, obs: &Tensor, act: &Tensor, members: &Members) -> ddppo_agent::Result<Prediction> {
        Ok(Self::split(self.select(obs, act, &members.rows), obs))
    }
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn check_adjoint(threshold: f32, expect_some_done: bool) {
    let d = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let policy = GaussianPolicy::new(OBS, &[-1.0, -2.0], &[1.0, 0.5], &[8, 8], DType::F64, &d, &mut rng).unwrap();
    let critic = SacCritic::new(OBS, ACT, &[8, 8], DType::F64, &d, &mut rng).unwrap();
    let prediction = RandomEnsemble::new(3, &mut rng, 0.1);
    let gradient = RandomEnsemble::new(2, &mut rng, 0.0);
    let terminal = move |s: &[f32]| s[0].abs() > threshold;
    let rollout = ModelEnv::new(Box::new(&prediction), Derivatives::Separate(Box::new(&gradient)), Box::new(terminal));
    let rows = 16;
    let s0: Vec<f64> = (0..rows * OBS).map(|_| rng.random_range(-1.0..1.0)).collect();
    let s0 = Tensor::from_vec(s0, (rows, OBS), &d).unwrap();
    let (horizon, gamma, alpha) = (4, 0.97, 0.3);
    let out = policy_objective(&policy, &critic, &rollout, &s0, horizon, gamma, alpha, &mut rng).unwrap();
    let dead = out.trajectory.alive[horizon].iter().filter(|a| **a == 0.0).count();
    if expect_some_done {
        assert!(dead > 0 && dead < rows, "terminations should hit some rows, not all: {dead}/{rows}");
        let mid = out.trajectory.alive[1..horizon].iter().flatten().filter(|a| **a == 0.0).count();
        assert!(mid > 0, "some termination must fall inside the horizon");
    } else {
        assert_eq!(dead, 0);
    }
    let grads = out.objective.backward().unwrap();
    let adjoint = adjoint_policy_gradient(&policy, &critic, &gradient, &out.trajectory, gamma, alpha).unwrap();
    let mut max_norm = 0.0f64;
    for (v, a) in policy.vars().iter().zip(&adjoint) {
        let st = flat(grads.get(v.as_tensor()).expect("policy parameter without gradient"));
        let ad = flat(a);
        for (x, y) in st.iter().zip(&ad) {
            max_norm = max_norm.max(x.abs());
            assert!((x - y).abs() <= 1e-10 * (1.0 + x.abs()), "straight-through {x} vs adjoint {y}");
        }
    }
    assert!(max_norm > 1e-3, "gradient is trivially zero");
}

#[test]
fn straight_through_equals_adjoint_recursion() {
    check_adjoint(f32::INFINITY, false);
}

#[test]
fn straight_through_equals_adjoint_recursion_with_terminations() {
    check_adjoint(1.0, true);
}

/// A derivative from the prediction model would differ: the gradient model
/// really is what the straight-through path differentiates.
#[test]
fn gradient_comes_from_the_gradient_model() {
    let d = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let policy = GaussianPolicy::new(OBS, &[-1.0, -1.0], &[1.0, 1.0], &[8], DType::F64, &d, &mut rng).unwrap();
    let critic = SacCritic::new(OBS, ACT, &[8], DType::F64, &d, &mut rng).unwrap();
    let prediction = RandomEnsemble::new(1, &mut rng, 0.0);
    let gradient = RandomEnsemble::new(1, &mut rng, 0.0);
    let never = |_: &[f32]| false;
    let s0 = Tensor::from_vec((0..8 * OBS).map(|i| (i as f64 * 0.37).sin()).collect::<Vec<_>>(), (8, OBS), &d).unwrap();
    let grad_with = |g: &dyn DynamicsModel| {
        let rollout = ModelEnv::new(Box::new(&prediction), Derivatives::Separate(Box::new(g)), Box::new(never));
        let mut r = ChaCha8Rng::seed_from_u64(9);
        let out = policy_objective(&policy, &critic, &rollout, &s0, 2, 0.9, 0.1, &mut r).unwrap();
        let v = out.objective.to_scalar::<f64>().unwrap();
        let g = out.objective.backward().unwrap();
        (v, flat(g.get(policy.vars()[0].as_tensor()).unwrap()))
    };
    let (v1, g1) = grad_with(&gradient);
    let (v2, g2) = grad_with(&prediction);
    assert!((v1 - v2).abs() < 1e-12, "the value must come from the prediction model only");
    let diff: f64 = g1.iter().zip(&g2).map(|(a, b)| (a - b).abs()).sum();
    assert!(diff > 1e-4, "gradients must differ when the gradient model differs");
}

/// `s' = A s + B a`, `r = -(s'Qs + a'Ra)` (Q, R diagonal), exact: mean = sample.
struct Linear {
    a: [[f64; OBS]; OBS],
    b: [[f64; ACT]; OBS],
    q: [f64; OBS],
    r: [f64; ACT],
}

impl Linear {
    fn new() -> Self {
        Self {
            a: [[0.9, 0.1, 0.0], [-0.2, 0.8, 0.3], [0.05, 0.0, 0.95]],
            b: [[0.5, 0.0], [0.1, -0.4], [0.0, 0.3]],
            q: [1.0, 0.5, 0.2],
            r: [0.1, 0.3],
        }
    }
    fn host_step(&self, s: &[f64], a: &[f64]) -> (f64, Vec<f64>) {
        let next: Vec<f64> = (0..OBS)
            .map(|i| {
                (0..OBS).map(|j| self.a[i][j] * s[j]).sum::<f64>() + (0..ACT).map(|j| self.b[i][j] * a[j]).sum::<f64>()
            })
            .collect();
        let r = -(0..OBS).map(|i| self.q[i] * s[i] * s[i]).sum::<f64>()
            - (0..ACT).map(|i| self.r[i] * a[i] * a[i]).sum::<f64>();
        (r, next)
    }
}

impl DynamicsModel for Linear {
    fn draw_members(&self, rows: usize, _: &mut ChaCha8Rng) -> Vec<usize> {
        vec![0; rows]
    }
    fn noise_width(&self) -> usize {
        0
    }
    fn sample(&self, obs: &Tensor, act: &Tensor, m: &Members, _: Option<&Tensor>) -> ddppo_agent::Result<Prediction> {
        self.mean(obs, act, m)
    }
    fn mean(&self, obs: &Tensor, act: &Tensor, _: &Members) -> ddppo_agent::Result<Prediction> {
        let d = Device::Cpu;
        let at = Tensor::new(&self.a, &d).unwrap().t().unwrap();
        let bt = Tensor::new(&self.b, &d).unwrap().t().unwrap();
        let next = (obs.matmul(&at).unwrap() + act.matmul(&bt).unwrap()).unwrap();
        let q = Tensor::new(&self.q, &d).unwrap();
        let r = Tensor::new(&self.r, &d).unwrap();
        let reward = (obs.sqr().unwrap().broadcast_mul(&q).unwrap().sum(1).unwrap()
            + act.sqr().unwrap().broadcast_mul(&r).unwrap().sum(1).unwrap())
        .unwrap()
        .neg()
        .unwrap();
        Ok(Prediction { reward, next_obs: next })
    }
}

/// Host f64 MLP with ReLU hidden layers from a VarMap's `prefix.l{i}` tensors.
fn host_mlp(
    params: &HashMap<String, Vec<f64>>,
    shapes: &HashMap<String, (usize, usize)>,
    prefix: &str,
    x: &[f64],
) -> Vec<f64> {
    let mut h = x.to_vec();
    let mut i = 0;
    while let Some(w) = params.get(&format!("{prefix}.l{i}.weight")) {
        let (out, inp) = shapes[&format!("{prefix}.l{i}.weight")];
        let b = &params[&format!("{prefix}.l{i}.bias")];
        let last = !params.contains_key(&format!("{prefix}.l{}.weight", i + 1));
        h = (0..out)
            .map(|o| {
                let z = b[o] + (0..inp).map(|k| w[o * inp + k] * h[k]).sum::<f64>();
                if last { z } else { z.max(0.0) }
            })
            .collect();
        i += 1;
    }
    h
}

fn read(vm: &candle_nn::VarMap) -> (HashMap<String, Vec<f64>>, HashMap<String, (usize, usize)>) {
    let data = vm.data().lock().unwrap();
    let mut p = HashMap::new();
    let mut s = HashMap::new();
    for (k, v) in data.iter() {
        let t = v.as_tensor();
        let dims = t.dims().to_vec();
        s.insert(k.clone(), (dims[0], *dims.get(1).unwrap_or(&1)));
        p.insert(k.clone(), flat(t));
    }
    (p, s)
}

/// `J / B` of equation 11 evaluated on the host, written from the equation.
fn host_objective(
    pol: &HashMap<String, Vec<f64>>,
    pol_shapes: &HashMap<String, (usize, usize)>,
    crit: &HashMap<String, Vec<f64>>,
    crit_shapes: &HashMap<String, (usize, usize)>,
    sys: &Linear,
    s0: &[Vec<f64>],
    noise: &[Vec<Vec<f64>>],
    low: &[f64],
    high: &[f64],
    (horizon, gamma, alpha): (usize, f64, f64),
) -> f64 {
    let act = |s: &[f64], e: &[f64]| -> (Vec<f64>, f64) {
        let out = host_mlp(pol, pol_shapes, "policy", s);
        let mut a = vec![0.0; ACT];
        let mut logp = 0.0;
        for i in 0..ACT {
            let ls = out[ACT + i].clamp(-20.0, 2.0);
            let u = out[i] + ls.exp() * e[i];
            let scale = (high[i] - low[i]) / 2.0;
            a[i] = u.tanh() * scale + (high[i] + low[i]) / 2.0;
            let z = (u - out[i]) / ls.exp();
            logp += -0.5 * z * z
                - ls
                - 0.5 * (2.0 * std::f64::consts::PI).ln()
                - (scale * (1.0 - u.tanh().powi(2)) + 1e-6).ln();
        }
        (a, logp)
    };
    let mut total = 0.0;
    for (row, s0) in s0.iter().enumerate() {
        let mut s = s0.clone();
        let mut j = 0.0;
        for t in 0..horizon {
            let (a, logp) = act(&s, &noise[t][row]);
            let (r, next) = sys.host_step(&s, &a);
            j += gamma.powi(t as i32) * (r - alpha * logp);
            s = next;
        }
        let (a, logp) = act(&s, &noise[horizon][row]);
        let x: Vec<f64> = s.iter().chain(&a).copied().collect();
        let q1 = host_mlp(crit, crit_shapes, "q1", &x)[0];
        let q2 = host_mlp(crit, crit_shapes, "q2", &x)[0];
        j += gamma.powi(horizon as i32) * (q1.min(q2) - alpha * logp);
        total += j;
    }
    total / s0.len() as f64
}

#[test]
fn linear_dynamics_gradient_matches_finite_differences() {
    let d = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (low, high) = ([-1.0, -0.5], [1.0, 1.5]);
    let policy = GaussianPolicy::new(OBS, &low, &high, &[6, 6], DType::F64, &d, &mut rng).unwrap();
    let critic = SacCritic::new(OBS, ACT, &[6], DType::F64, &d, &mut rng).unwrap();
    let sys = Linear::new();
    let never = |_: &[f32]| false;
    let rollout = ModelEnv::new(Box::new(&sys), Derivatives::Separate(Box::new(&sys)), Box::new(never));
    let rows = 5;
    let s0v: Vec<Vec<f64>> = (0..rows).map(|_| (0..OBS).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
    let s0 = Tensor::from_vec(s0v.concat(), (rows, OBS), &d).unwrap();
    let knobs = (3usize, 0.95, 0.2);
    let out = policy_objective(&policy, &critic, &rollout, &s0, knobs.0, knobs.1, knobs.2, &mut rng).unwrap();
    let noise: Vec<Vec<Vec<f64>>> = out.trajectory.noise.iter().map(|n| n.to_vec2::<f64>().unwrap()).collect();
    let (crit, crit_shapes) = read(critic.varmap());
    let (pol0, pol_shapes) = read(policy.varmap());
    let j_host = host_objective(&pol0, &pol_shapes, &crit, &crit_shapes, &sys, &s0v, &noise, &low, &high, knobs);
    let j = out.objective.to_scalar::<f64>().unwrap();
    assert!((j - j_host).abs() < 1e-10 * (1.0 + j.abs()), "objective {j} vs host {j_host}");
    let grads = out.objective.backward().unwrap();
    let h = 1e-6;
    let mut checked = 0;
    let names: Vec<String> = {
        let mut n: Vec<String> = pol0.keys().cloned().collect();
        n.sort();
        n
    };
    let data = policy.varmap().data().lock().unwrap();
    for name in &names {
        let var = &data[name];
        let g = flat(grads.get(var.as_tensor()).unwrap());
        for k in 0..pol0[name].len() {
            let mut plus = pol0.clone();
            plus.get_mut(name).unwrap()[k] += h;
            let mut minus = pol0.clone();
            minus.get_mut(name).unwrap()[k] -= h;
            let fp = host_objective(&plus, &pol_shapes, &crit, &crit_shapes, &sys, &s0v, &noise, &low, &high, knobs);
            let fm = host_objective(&minus, &pol_shapes, &crit, &crit_shapes, &sys, &s0v, &noise, &low, &high, knobs);
            let fd = (fp - fm) / (2.0 * h);
            assert!(
                (fd - g[k]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{name}[{k}]: autograd {} vs finite difference {fd}",
                g[k]
            );
            checked += 1;
        }
    }
    assert!(checked > 50);
}
