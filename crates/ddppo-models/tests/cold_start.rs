//! Regression test of the Ant collapse's cause (issue 11): on a cold start
//! with short epochs the holdout MSE moves under 1% per epoch for the first
//! epochs, and MBPO's plain stopping rule (`cold_start_wait = 0`) stops the
//! ensemble there, before it has learnt anything. The default waits for the
//! first improvement and trains the ensemble.
use ddppo_models::{EnsembleConfig, ModelEnsemble, TransitionData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const OBS: usize = 6;
const ACT: usize = 2;

/// Rows of a smooth nonlinear system with large-scale state changes (the
/// scale of Ant's joint velocities), few enough that an epoch is 3 minibatches.
fn data(rows: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (mut obs, mut act, mut rew, mut next) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rows {
        let s: Vec<f32> = (0..OBS).map(|_| rng.random_range(-3.0..3.0)).collect();
        let a: Vec<f32> = (0..ACT).map(|_| rng.random_range(-1.0..1.0)).collect();
        for i in 0..OBS {
            let ds = 3.0 * (s[(i + 1) % OBS] * s[(i + 2) % OBS]).tanh();
            next.push(s[i] + ds);
        }
        rew.push(-0.5 * a.iter().map(|x| x * x).sum::<f32>() + s[0].sin());
        obs.extend(s);
        act.extend(a);
    }
    (obs, act, rew, next)
}

/// Epochs run and the first and last epoch's mean holdout MSE.
fn train(wait: usize) -> (usize, f64, f64) {
    let cfg = EnsembleConfig {
        ensemble_size: 3,
        elites: 2,
        hidden: 32,
        hidden_layers: 2,
        weight_decay: vec![2.5e-5, 5e-5, 1e-4],
        cold_start_wait: wait,
        max_epochs: Some(400),
        ..Default::default()
    };
    let (obs, act, rew, next) = data(1000);
    let d = TransitionData { obs: &obs, act: &act, rew: &rew, next_obs: &next };
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut ens =
        ModelEnsemble::new(OBS, ACT, &cfg, None, &candle_core::Device::Cpu, candle_core::DType::F32, &mut rng).unwrap();
    let mut curve = Vec::new();
    let report = ens
        .train_with(&d, &mut rng, &mut |_, s| {
            curve.push(s.holdout_mse.iter().sum::<f64>() / s.holdout_mse.len() as f64);
            Ok(())
        })
        .unwrap();
    (report.epochs, curve[0], *curve.last().unwrap())
}

#[test]
fn a_cold_ensemble_is_not_stopped_before_it_learns() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: set before any tensor work of this test binary.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    let (plain_epochs, first, plain_last) = train(0);
    eprintln!("plain: {plain_epochs} epochs, holdout MSE {first:.3} -> {plain_last:.3}");
    let (epochs, _, last) = train(EnsembleConfig::default().cold_start_wait);
    eprintln!("default: {epochs} epochs, holdout MSE {first:.3} -> {last:.3}");
    // The plain rule stops after 1 + patience epochs having learnt almost nothing.
    assert_eq!(plain_epochs, 6);
    assert!(plain_last > 0.95 * first, "{plain_last} vs {first}");
    // The default trains on, well past the plateau.
    assert!(epochs > 20, "{epochs}");
    assert!(last < 0.5 * first, "{last} vs {first}");
}
