//! The SAC pieces against hand-computed values on tiny inputs.

use candle_core::{DType, Device, Tensor};
use ddppo_agent::nn::Adam;
use ddppo_agent::sac::{GaussianPolicy, SacCritic, Temperature, critic_target};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const HALF_LOG_2PI: f64 = 0.918_938_533_204_672_8;

fn set(vm: &candle_nn::VarMap, name: &str, value: &[f64], shape: &[usize]) {
    let data = vm.data().lock().unwrap();
    let var = data.get(name).unwrap_or_else(|| panic!("no var {name}"));
    var.set(&Tensor::from_slice(value, shape, &Device::Cpu).unwrap()).unwrap();
}

fn zero_all(vm: &candle_nn::VarMap) {
    let data = vm.data().lock().unwrap();
    for v in data.values() {
        v.set(&v.as_tensor().zeros_like().unwrap()).unwrap();
    }
}

/// A policy whose output is the constant (mu, log_std) whatever the state.
fn constant_policy(mu: f64, log_std: f64) -> GaussianPolicy {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let p = GaussianPolicy::new(1, &[-2.0], &[2.0], &[3], DType::F64, &Device::Cpu, &mut rng).unwrap();
    zero_all(p.varmap());
    set(p.varmap(), "policy.l1.bias", &[mu, log_std], &[2]);
    p
}

#[test]
fn tanh_log_prob_matches_hand_computation() {
    let (mu, log_std) = (0.3, -0.7f64);
    let p = constant_policy(mu, log_std);
    let obs = Tensor::new(&[[0.5f64], [-1.0]], &Device::Cpu).unwrap();
    let eps = Tensor::new(&[[1.2f64], [-0.4]], &Device::Cpu).unwrap();
    let s = p.sample_with_noise(&obs, &eps).unwrap();
    let act = s.action.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let logp = s.logp.to_vec1::<f64>().unwrap();
    for (i, e) in [1.2f64, -0.4].iter().enumerate() {
        let u = mu + log_std.exp() * e;
        // Density of u under N(mu, std), computed from u itself.
        let z = (u - mu) / log_std.exp();
        let gauss = -0.5 * z * z - log_std - HALF_LOG_2PI;
        let want_logp = gauss - (2.0 * (1.0 - u.tanh().powi(2)) + 1e-6).ln();
        assert!((act[i] - 2.0 * u.tanh()).abs() < 1e-12, "action {i}: {} vs {}", act[i], 2.0 * u.tanh());
        assert!((logp[i] - want_logp).abs() < 1e-12, "logp {i}: {} vs {want_logp}", logp[i]);
    }
    // The deterministic action is tanh(mu) rescaled, on host and tensor paths.
    let det = p.mean_action(&obs).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let snap = p.snapshot().unwrap();
    for (d, o) in det.iter().zip([0.5, -1.0]) {
        assert!((d - 2.0 * mu.tanh()).abs() < 1e-12);
        assert!((snap.mean_action(&[o])[0] - 2.0 * mu.tanh()).abs() < 1e-12);
    }
}

#[test]
fn log_std_is_clamped() {
    let p = constant_policy(0.0, 5.0);
    let obs = Tensor::new(&[[0.0f64]], &Device::Cpu).unwrap();
    let (_, ls) = p.distribution(&obs).unwrap();
    assert_eq!(ls.flatten_all().unwrap().to_vec1::<f64>().unwrap(), vec![2.0]);
    let p = constant_policy(0.0, -25.0);
    let (_, ls) = p.distribution(&obs).unwrap();
    assert_eq!(ls.flatten_all().unwrap().to_vec1::<f64>().unwrap(), vec![-20.0]);
}

#[test]
fn critic_target_matches_hand_computation() {
    let d = Device::Cpu;
    let r = Tensor::new(&[1.0f64, 2.0, -0.5], &d).unwrap();
    let mask = Tensor::new(&[1.0f64, 0.0, 1.0], &d).unwrap();
    let q = Tensor::new(&[3.0f64, 4.0, -2.0], &d).unwrap();
    let logp = Tensor::new(&[-1.0f64, 0.5, 2.0], &d).unwrap();
    let y = critic_target(&r, &mask, &q, &logp, 0.2, 0.99).unwrap().to_vec1::<f64>().unwrap();
    let want = [1.0 + 0.99 * (3.0 + 0.2), 2.0, -0.5 + 0.99 * (-2.0 - 0.4)];
    for (a, b) in y.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
}

#[test]
fn critic_loss_matches_hand_computation() {
    let d = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let critic = SacCritic::new(1, 1, &[4], DType::F64, &d, &mut rng).unwrap();
    // Online Q1 = 1.5, Q2 = -0.5 everywhere; targets Q1' = 2, Q2' = 3.
    zero_all(critic.varmap());
    zero_all(critic.target_varmap());
    set(critic.varmap(), "q1.l1.bias", &[1.5], &[1]);
    set(critic.varmap(), "q2.l1.bias", &[-0.5], &[1]);
    set(critic.target_varmap(), "q1.l1.bias", &[2.0], &[1]);
    set(critic.target_varmap(), "q2.l1.bias", &[3.0], &[1]);
    let (mu, log_std) = (0.1, -1.0f64);
    let policy = constant_policy(mu, log_std);
    let obs = Tensor::new(&[[0.2f64], [0.4]], &d).unwrap();
    let act = Tensor::new(&[[0.0f64], [1.0]], &d).unwrap();
    let rew = Tensor::new(&[1.0f64, -1.0], &d).unwrap();
    let mask = Tensor::new(&[1.0f64, 0.0], &d).unwrap();
    let (alpha, gamma) = (0.3, 0.9);
    let mut noise_rng = ChaCha8Rng::seed_from_u64(7);
    let loss = critic.loss(&policy, &obs, &act, &rew, &obs, &mask, alpha, gamma, &mut noise_rng).unwrap();
    // The same noise the loss drew for a' ~ pi(s').
    let mut replay = ChaCha8Rng::seed_from_u64(7);
    let eps: Vec<f64> = (0..2).map(|_| rand::Rng::sample(&mut replay, rand_distr::StandardNormal)).collect();
    let mut want = 0.0;
    for i in 0..2 {
        let u = mu + log_std.exp() * eps[i];
        let logp = -0.5 * eps[i] * eps[i] - log_std - HALF_LOG_2PI - (2.0 * (1.0 - u.tanh().powi(2)) + 1e-6).ln();
        let m = [1.0, 0.0][i];
        let y = [1.0, -1.0][i] + m * gamma * (2.0 - alpha * logp);
        want += ((1.5 - y).powi(2) + (-0.5 - y).powi(2)) / 2.0;
    }
    let got = loss.to_scalar::<f64>().unwrap();
    assert!((got - want).abs() < 1e-10, "{got} vs {want}");
}

#[test]
fn target_networks_track_with_tau() {
    let d = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let critic = SacCritic::new(1, 1, &[4], DType::F64, &d, &mut rng).unwrap();
    zero_all(critic.target_varmap());
    set(critic.varmap(), "q1.l1.bias", &[10.0], &[1]);
    critic.update_targets(0.005).unwrap();
    let data = critic.target_varmap().data().lock().unwrap();
    let b = data["q1.l1.bias"].as_tensor().to_vec1::<f64>().unwrap()[0];
    assert!((b - 0.05).abs() < 1e-12, "{b}");
}

#[test]
fn temperature_loss_matches_equation_13() {
    let d = Device::Cpu;
    let t = Temperature::new(0.5, -1.0, DType::F64, &d).unwrap();
    let logp = Tensor::new(&[-1.0f64, -3.0], &d).unwrap();
    let loss = t.loss(&logp).unwrap();
    // -alpha * mean(logp + target) = -0.5 * ((-2) + (-4)) / 2 = 1.5
    assert!((loss.to_scalar::<f64>().unwrap() - 1.5).abs() < 1e-12);
    // d loss / d log_alpha = loss (alpha = exp(log_alpha)).
    let g = loss.backward().unwrap();
    let gl = g.get(t.var().as_tensor()).unwrap().to_vec1::<f64>().unwrap()[0];
    assert!((gl - 1.5).abs() < 1e-12);
    assert!(Temperature::new(-1.0, -1.0, DType::F64, &d).is_err());
}

#[test]
fn adam_matches_hand_computation_and_clips() {
    let d = Device::Cpu;
    let v = candle_core::Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &d).unwrap()).unwrap();
    let mut adam = Adam::new(vec![v.clone()], 0.1, Some(5.0)).unwrap();
    // Gradients 10 (clipped to 5) and -0.5.
    let g1 = Tensor::new(&[10.0f64, -0.5], &d).unwrap();
    adam.step_with(|_| Some(g1.clone())).unwrap();
    let g2 = Tensor::new(&[1.0f64, 0.5], &d).unwrap();
    adam.step_with(|_| Some(g2.clone())).unwrap();
    let got = v.as_tensor().to_vec1::<f64>().unwrap();
    let (b1, b2, eps, lr) = (0.9f64, 0.999f64, 1e-8, 0.1);
    for (i, (x0, gs)) in [(1.0, [5.0, 1.0]), (-2.0, [-0.5, 0.5])].iter().enumerate() {
        let (mut x, mut m, mut s) = (*x0, 0.0, 0.0);
        for (t, g) in gs.iter().enumerate() {
            m = b1 * m + (1.0 - b1) * g;
            s = b2 * s + (1.0 - b2) * g * g;
            let t = (t + 1) as i32;
            x -= lr * (m / (1.0 - b1.powi(t))) / ((s / (1.0 - b2.powi(t))).sqrt() + eps);
        }
        assert!((got[i] - x).abs() < 1e-12, "{i}: {} vs {x}", got[i]);
    }
}

#[test]
fn bad_action_bounds_are_rejected() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    assert!(GaussianPolicy::new(1, &[1.0], &[-1.0], &[3], DType::F64, &Device::Cpu, &mut rng).is_err());
    assert!(GaussianPolicy::new(1, &[1.0, 0.0], &[2.0], &[3], DType::F64, &Device::Cpu, &mut rng).is_err());
}

#[test]
fn frozen_q_matches_q_and_leaves_critic_without_gradient() {
    let d = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let critic = SacCritic::new(2, 1, &[5, 5], DType::F64, &d, &mut rng).unwrap();
    let obs = candle_core::Var::from_tensor(&Tensor::new(&[[0.3f64, -0.2], [1.0, 0.5]], &d).unwrap()).unwrap();
    let act = Tensor::new(&[[0.1f64], [-0.7]], &d).unwrap();
    let q = critic.min_q(obs.as_tensor(), &act).unwrap();
    let qf = critic.min_q_frozen(obs.as_tensor(), &act).unwrap();
    assert_eq!(q.to_vec1::<f64>().unwrap(), qf.to_vec1::<f64>().unwrap());
    let g = q.sum_all().unwrap().backward().unwrap();
    let gf = qf.sum_all().unwrap().backward().unwrap();
    let ds = g.get(obs.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let dsf = gf.get(obs.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert!(ds.iter().any(|v| *v != 0.0));
    assert_eq!(ds, dsf);
    for v in critic.vars() {
        assert!(g.get(v.as_tensor()).is_some());
        assert!(gf.get(v.as_tensor()).is_none(), "frozen Q must not produce parameter gradients");
    }
}

/// The critic's loss split into its two networks' terms, each differentiated
/// on its own (on two threads where the machine has a second core), gives
/// the summed loss's value and every parameter's gradient bit for bit, in
/// f32 at a random critic and batch.
#[test]
fn critic_terms_apart_equal_the_summed_loss() {
    let d = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (od, ad, rows) = (7, 3, 96);
    let critic = SacCritic::new(od, ad, &[64, 64], DType::F32, &d, &mut rng).unwrap();
    let policy = GaussianPolicy::new(od, &vec![-1.0; ad], &vec![1.0; ad], &[64, 64], DType::F32, &d, &mut rng).unwrap();
    let randn = |rng: &mut ChaCha8Rng, r: usize, c: usize| {
        let v: Vec<f32> = (0..r * c).map(|_| rand::Rng::random_range(rng, -1.0..1.0)).collect();
        Tensor::from_vec(v, (r, c), &d).unwrap()
    };
    let (obs, act, next) = (randn(&mut rng, rows, od), randn(&mut rng, rows, ad), randn(&mut rng, rows, od));
    let rew = randn(&mut rng, rows, 1).squeeze(1).unwrap();
    let mask = Tensor::ones(rows, DType::F32, &d).unwrap();
    let summed =
        critic.loss(&policy, &obs, &act, &rew, &next, &mask, 0.2, 0.99, &mut ChaCha8Rng::seed_from_u64(9)).unwrap();
    let grads = summed.backward().unwrap();
    let (apart, [g1, g2]) = critic
        .loss_and_grads(&policy, &obs, &act, &rew, &next, &mask, 0.2, 0.99, &mut ChaCha8Rng::seed_from_u64(9))
        .unwrap();
    let bits =
        |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&summed.unsqueeze(0).unwrap()), bits(&apart.unsqueeze(0).unwrap()));
    for var in critic.vars() {
        let want = grads.get(var.as_tensor()).expect("every critic parameter has a gradient");
        let (a, b) = (g1.get(var.as_tensor()), g2.get(var.as_tensor()));
        assert!(a.is_some() != b.is_some(), "a parameter's gradient sits in exactly one store");
        assert_eq!(bits(want), bits(a.or(b).unwrap()));
    }
}
