//! Member-parallel kernels: the same training with the members spread over 1, 2
//! or 3 threads gives the same weights, scaler, elites and reports bit for bit
//! (each member is computed by the same code whichever thread runs it).
//!
//! The shapes are large enough that every kernel (hidden-layer products and
//! activations, forward and backward, and the small Jacobian-direction products,
//! `n > in` here) takes its multi-threaded path.
use candle_core::{DType, Device, Tensor};
use ddppo_models::{
    EnsembleConfig, GradientLossConfig, ModelEnsemble, ProbabilisticEnsemble, TrainReport, TransitionData,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const OBS: usize = 4;
const ACT: usize = 2;

fn cfg() -> EnsembleConfig {
    EnsembleConfig {
        // Odd, so two threads get unequal groups (3 + 2).
        ensemble_size: 5,
        elites: 3,
        hidden: 64,
        hidden_layers: 3,
        weight_decay: vec![2.5e-5, 5e-5, 7.5e-5, 1e-4],
        batch_size: 256,
        max_epochs: Some(2),
        ..Default::default()
    }
}

fn grad_cfg() -> GradientLossConfig {
    GradientLossConfig {
        // More than the 6 input dimensions: the Jacobian-column path.
        neighbours: 8,
        weight: 5.0,
        ..Default::default()
    }
}

struct Data {
    obs: Vec<f32>,
    act: Vec<f32>,
    rew: Vec<f32>,
    next: Vec<f32>,
}

fn data(n: usize) -> Data {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut d = Data { obs: vec![], act: vec![], rew: vec![], next: vec![] };
    for _ in 0..n {
        let s: Vec<f32> = (0..OBS).map(|_| rng.random_range(-1.0..1.0)).collect();
        let a: Vec<f32> = (0..ACT).map(|_| rng.random_range(-1.0..1.0)).collect();
        d.rew.push(-s[0] * s[0] + 0.5 * a[0] * s[1]);
        for i in 0..OBS {
            d.next.push(s[i] + 0.1 * (s[(i + 1) % OBS].sin() + a[i % ACT]));
        }
        d.obs.extend(s);
        d.act.extend(a);
    }
    d
}

/// Every parameter, by sorted name, as raw bits.
fn bits(ens: &ProbabilisticEnsemble) -> Vec<(String, Vec<u64>)> {
    let data = ens.varmap().data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let v = data[&n].as_tensor().flatten_all().unwrap().to_dtype(DType::F64).unwrap();
            (n, v.to_vec1::<f64>().unwrap().iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

/// What a training call leaves behind, comparable bit for bit.
#[derive(Debug, PartialEq)]
struct Outcome {
    params: Vec<(String, Vec<u64>)>,
    scaler: (Vec<u64>, Vec<u64>),
    elites: Vec<usize>,
    reports: Vec<(usize, Vec<u64>, u64, Option<u64>)>,
    /// The frozen view's means on fixed inputs (the rollout and policy-update path).
    mean: Vec<u64>,
    /// The policy update's path: rows grouped by member (one member per kernel
    /// call, its products and activations split over the helper threads), the
    /// mean and a sample, and the gradient of both in the inputs.
    grouped: Vec<u64>,
}

fn outcome(ens: &ProbabilisticEnsemble, reports: &[TrainReport]) -> Outcome {
    let b = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let (mu, sd) = ens.scaler();
    let rows = 600;
    let s: Vec<f32> = (0..rows * OBS).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let a: Vec<f32> = (0..rows * ACT).map(|i| ((i * 13 % 29) as f32 / 14.0) - 1.0).collect();
    let s = Tensor::from_vec(s, (rows, OBS), &Device::Cpu).unwrap().to_dtype(ens.dtype()).unwrap();
    let a = Tensor::from_vec(a, (rows, ACT), &Device::Cpu).unwrap().to_dtype(ens.dtype()).unwrap();
    let members: Vec<usize> = (0..rows).map(|i| i % ens.config().ensemble_size).collect();
    let step = ens.frozen().mean(&s, &a, &members).unwrap();
    let mean = step
        .next_obs
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let rows = 2000;
    let s: Vec<f32> = (0..rows * OBS).map(|i| ((i * 31 % 97) as f32 / 48.0) - 1.0).collect();
    let a: Vec<f32> = (0..rows * ACT).map(|i| ((i * 11 % 23) as f32 / 11.0) - 1.0).collect();
    let s = candle_core::Var::from_tensor(
        &Tensor::from_vec(s, (rows, OBS), &Device::Cpu).unwrap().to_dtype(ens.dtype()).unwrap(),
    )
    .unwrap();
    let a = Tensor::from_vec(a, (rows, ACT), &Device::Cpu).unwrap().to_dtype(ens.dtype()).unwrap();
    let members: Vec<usize> = (0..rows).map(|i| (i * 7 + i / 3) % ens.config().ensemble_size).collect();
    let frozen = ens.frozen();
    let groups = frozen.group_members(&[&members]).unwrap().pop().unwrap();
    let eps = Tensor::from_vec(
        (0..rows * (1 + OBS)).map(|i| ((i * 17 % 41) as f32 / 20.0) - 1.0).collect::<Vec<f32>>(),
        (rows, 1 + OBS),
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(ens.dtype())
    .unwrap();
    let m = frozen.mean_grouped(s.as_tensor(), &a, &groups).unwrap();
    let y = frozen.sample_grouped(s.as_tensor(), &a, &groups, &eps).unwrap();
    let loss = (m.next_obs.sqr().unwrap().sum_all().unwrap() + y.reward.sum_all().unwrap()).unwrap();
    let g = loss.backward().unwrap().get(s.as_tensor()).unwrap().clone();
    let grouped = [m.next_obs.flatten_all().unwrap(), y.next_obs.flatten_all().unwrap(), g.flatten_all().unwrap()]
        .iter()
        .flat_map(|t| t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap())
        .map(f64::to_bits)
        .collect();
    Outcome {
        grouped,
        params: bits(ens),
        scaler: (b(mu), b(sd)),
        elites: ens.elites().to_vec(),
        reports: reports
            .iter()
            .map(|r| (r.epochs, b(&r.holdout_mse), r.train_loss.to_bits(), r.derivative_loss.map(f64::to_bits)))
            .collect(),
        mean,
    }
}

/// Two training calls (the second continues the first's Adam state).
fn train(gradient: bool, threads: usize, dtype: DType) -> Outcome {
    let d = data(1200);
    let view = TransitionData { obs: &d.obs, act: &d.act, rew: &d.rew, next_obs: &d.next };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    if gradient {
        let mut m = ModelEnsemble::new(OBS, ACT, &cfg(), Some(&grad_cfg()), &Device::Cpu, dtype, &mut rng).unwrap();
        m.ensemble_mut().set_threads(threads);
        assert_eq!(m.ensemble().threads(), threads);
        let r = vec![m.train(&view, &mut rng).unwrap(), m.train(&view, &mut rng).unwrap()];
        outcome(m.ensemble(), &r)
    } else {
        let mut m = ModelEnsemble::new(OBS, ACT, &cfg(), None, &Device::Cpu, dtype, &mut rng).unwrap();
        m.ensemble_mut().set_threads(threads);
        let r = vec![m.train(&view, &mut rng).unwrap(), m.train(&view, &mut rng).unwrap()];
        outcome(m.ensemble(), &r)
    }
}

#[test]
fn gradient_ensemble_is_bit_identical_for_any_thread_count() {
    let one = train(true, 1, DType::F32);
    assert!(one.reports.iter().all(|r| r.3.is_some()));
    for t in [2, 3] {
        let other = train(true, t, DType::F32);
        assert!(other == one, "gradient ensemble, {t} threads differ from 1");
    }
}

#[test]
fn prediction_ensemble_is_bit_identical_for_any_thread_count() {
    let one = train(false, 1, DType::F32);
    assert!(train(false, 2, DType::F32) == one, "prediction ensemble, 2 threads differ from 1");
}

#[test]
fn f64_gradient_ensemble_is_bit_identical_for_two_threads() {
    assert!(train(true, 2, DType::F64) == train(true, 1, DType::F64));
}

#[test]
fn thread_count_is_at_least_one() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut m = ModelEnsemble::new(OBS, ACT, &cfg(), None, &Device::Cpu, DType::F32, &mut rng).unwrap();
    m.ensemble_mut().set_threads(0);
    assert_eq!(m.ensemble().threads(), 1);
}
