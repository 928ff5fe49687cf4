//! On the linear env `s' = A s + B a`, the trained models' Jacobians recover `[A B]`.
use candle_core::{DType, Device, Tensor};
use ddppo_env::{AnalyticDynamics, Env, LinearEnv, LinearSystem};
use ddppo_models::{EnsembleConfig, GradientLossConfig, ModelEnsemble, ProbabilisticEnsemble, TransitionData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Data {
    obs: Vec<f32>,
    act: Vec<f32>,
    rew: Vec<f32>,
    next: Vec<f32>,
}

fn collect(env: &mut LinearEnv, rows: usize, seed: u64) -> Data {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut d = Data { obs: vec![], act: vec![], rew: vec![], next: vec![] };
    let mut ep = 0;
    while d.rew.len() < rows {
        let mut s = env.reset(seed * 1000 + ep);
        ep += 1;
        // Short episodes keep the states spread over the reset box.
        for _ in 0..20 {
            let a: Vec<f64> = (0..env.act_dim()).map(|_| rng.random_range(-1.0..1.0)).collect();
            let st = env.step(&a).unwrap();
            d.obs.extend(s.iter().map(|&v| v as f32));
            d.act.extend(a.iter().map(|&v| v as f32));
            d.rew.push(st.reward as f32);
            d.next.extend(st.obs.iter().map(|&v| v as f32));
            s = st.obs;
        }
    }
    d
}

fn cfg() -> EnsembleConfig {
    EnsembleConfig {
        ensemble_size: 3,
        elites: 2,
        hidden: 32,
        hidden_layers: 2,
        weight_decay: vec![2.5e-5, 5e-5, 1e-4],
        batch_size: 64,
        max_epochs: Some(40),
        ..Default::default()
    }
}

/// Largest error of the elites' `d s'/d(s, a)` rows against `[A B]` over test points.
fn worst_dynamics_error(ens: &ProbabilisticEnsemble, env: &LinearEnv, test: &Data) -> f64 {
    let (n, m) = (env.obs_dim(), env.act_dim());
    let p = test.rew.len();
    let obs = Tensor::from_slice(&test.obs, (p, n), &Device::Cpu).unwrap();
    let act = Tensor::from_slice(&test.act, (p, m), &Device::Cpu).unwrap();
    let mut worst: f64 = 0.0;
    for &e in ens.elites() {
        let jac = ens.jacobian(&obs, &act, e).unwrap().to_dtype(DType::F64).unwrap().to_vec3::<f64>().unwrap();
        for (row, j) in jac.iter().enumerate() {
            let s: Vec<f64> = test.obs[row * n..(row + 1) * n].iter().map(|&v| v as f64).collect();
            let a: Vec<f64> = test.act[row * m..(row + 1) * m].iter().map(|&v| v as f64).collect();
            let exact = env.jacobian(&s, &a);
            for i in 0..n {
                for c in 0..n + m {
                    worst = worst.max((j[1 + i][c] - exact[(1 + i) * (n + m) + c]).abs());
                }
            }
        }
    }
    worst
}

#[test]
fn trained_jacobian_recovers_a_and_b() {
    let mut env = LinearEnv::new(LinearSystem::default()).unwrap();
    let train = collect(&mut env, 1500, 1);
    let test = collect(&mut env, 100, 2);
    let data = TransitionData { obs: &train.obs, act: &train.act, rew: &train.rew, next_obs: &train.next };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (n, m) = (env.obs_dim(), env.act_dim());
    let mut pred = ModelEnsemble::new(n, m, &cfg(), None, &Device::Cpu, DType::F32, &mut rng).unwrap();
    pred.train(&data, &mut rng).unwrap();
    let grad_cfg = GradientLossConfig { neighbours: 10, weight: 10.0, ..Default::default() };
    let mut grad = ModelEnsemble::new(n, m, &cfg(), Some(&grad_cfg), &Device::Cpu, DType::F32, &mut rng).unwrap();
    let report = grad.train(&data, &mut rng).unwrap();
    assert!(report.derivative_loss.is_some_and(|r| r.is_finite()));
    let (ep, eg) =
        (worst_dynamics_error(pred.ensemble(), &env, &test), worst_dynamics_error(grad.ensemble(), &env, &test));
    eprintln!("worst |J - [A B]|: prediction model {ep:.4}, gradient model {eg:.4}");
    // Entries of [A B] are 0, 0.1 and 0.9.
    assert!(ep < 0.1, "prediction model: worst Jacobian error {ep}");
    assert!(eg < 0.1, "gradient model: worst Jacobian error {eg}");
}
