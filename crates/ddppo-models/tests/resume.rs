//! Checkpoint and resume: the saved ensemble plus the optimiser state are all that
//! training carries from one call to the next, so a copy restored into a model built
//! with another seed trains on bit for bit like the original.
use candle_core::{DType, Device, Tensor};
use ddppo_models::{
    EnsembleConfig, Error, GradientLossConfig, ModelEnsemble, OptimizerState, ProbabilisticEnsemble, TransitionData,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const OBS: usize = 2;
const ACT: usize = 1;

fn cfg() -> EnsembleConfig {
    EnsembleConfig {
        ensemble_size: 3,
        elites: 2,
        hidden: 16,
        hidden_layers: 2,
        weight_decay: vec![2.5e-5, 5e-5, 1e-4],
        batch_size: 32,
        max_epochs: Some(3),
        ..Default::default()
    }
}

fn grad_cfg() -> GradientLossConfig {
    GradientLossConfig { neighbours: 3, weight: 1.0, ..Default::default() }
}

struct Data {
    obs: Vec<f32>,
    act: Vec<f32>,
    rew: Vec<f32>,
    next: Vec<f32>,
}

impl Data {
    fn view(&self) -> TransitionData<'_> {
        TransitionData { obs: &self.obs, act: &self.act, rew: &self.rew, next_obs: &self.next }
    }
}

/// Rows of a smooth nonlinear system `s' = s + 0.1 (sin(s_1), a - s_0)`.
fn data(seed: u64, n: usize) -> Data {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut d = Data { obs: vec![], act: vec![], rew: vec![], next: vec![] };
    for _ in 0..n {
        let s: [f32; 2] = [rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0)];
        let a: f32 = rng.random_range(-1.0..1.0);
        d.obs.extend(s);
        d.act.push(a);
        d.rew.push(-s[0] * s[0] - 0.1 * a * a);
        d.next.extend([s[0] + 0.1 * s[1].sin(), s[1] + 0.1 * (a - s[0])]);
    }
    d
}

/// Every parameter, by sorted name, as raw bits.
fn bits(ens: &ProbabilisticEnsemble) -> Vec<(String, Vec<u32>)> {
    let data = ens.varmap().data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    names
        .into_iter()
        .map(|k| {
            let v = data[&k].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (k, v.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

fn state_bits(s: &OptimizerState) -> (u64, Vec<Vec<u32>>) {
    let flat = |t: &Tensor| -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    };
    (s.step, s.m.iter().chain(&s.v).map(flat).collect())
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ddppo-models-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Trains `a` twice, clones it into `b` (built with another seed) through a file and
/// the optimiser state, trains both once more on new data with equal rngs: every
/// parameter, the scaler, the elites and the optimiser state end bit-identical. A
/// third copy given no optimiser state ends different, so the state matters.
fn resume_is_exact(mut a: ModelEnsemble, mut b: ModelEnsemble, mut fresh: ModelEnsemble, file: &str) {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    assert!(a.optimizer_state().is_none(), "no optimiser state before training");
    a.train(&data(1, 300).view(), &mut rng).unwrap();
    a.train(&data(2, 400).view(), &mut rng).unwrap();
    let state = a.optimizer_state().expect("state after training");
    assert!(state.step > 0);
    let state_then = state_bits(&state);

    let path = tmp(file);
    a.ensemble().save(&path).unwrap();
    assert_ne!(bits(a.ensemble()), bits(b.ensemble()), "b starts from other weights");
    b.ensemble_mut().load(&path).unwrap();
    b.restore_optimizer_state(Some(state.clone())).unwrap();
    fresh.ensemble_mut().load(&path).unwrap();
    fresh.restore_optimizer_state(None).unwrap();
    assert_eq!(bits(a.ensemble()), bits(b.ensemble()));

    let more = data(3, 500);
    let mut rng_b = rng.clone();
    let mut rng_f = rng.clone();
    a.train(&more.view(), &mut rng).unwrap();
    b.train(&more.view(), &mut rng_b).unwrap();
    fresh.train(&more.view(), &mut rng_f).unwrap();
    assert_eq!(bits(a.ensemble()), bits(b.ensemble()), "parameters after resuming");
    assert_eq!(a.ensemble().elites(), b.ensemble().elites());
    assert_eq!(a.ensemble().scaler(), b.ensemble().scaler());
    assert_eq!(state_bits(&a.optimizer_state().unwrap()), state_bits(&b.optimizer_state().unwrap()));
    assert_ne!(bits(a.ensemble()), bits(fresh.ensemble()), "a fresh Adam differs");
    // The state read before the last call is a snapshot, not a live view.
    assert_eq!(state_bits(&state), state_then);
    assert!(a.optimizer_state().unwrap().step > state.step);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn prediction_ensemble_resumes_bit_identically() {
    let dev = &Device::Cpu;
    let new = |seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        ModelEnsemble::new(OBS, ACT, &cfg(), None, dev, DType::F32, &mut rng).unwrap()
    };
    resume_is_exact(new(1), new(2), new(3), "pred.safetensors");
}

#[test]
fn gradient_ensemble_resumes_bit_identically() {
    let dev = &Device::Cpu;
    let new = |seed| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        ModelEnsemble::new(OBS, ACT, &cfg(), Some(&grad_cfg()), dev, DType::F32, &mut rng).unwrap()
    };
    resume_is_exact(new(1), new(2), new(3), "grad.safetensors");
}

#[test]
fn optimizer_state_of_another_shape_is_a_one_line_error() {
    let dev = &Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut a = ModelEnsemble::new(OBS, ACT, &cfg(), None, dev, DType::F32, &mut rng).unwrap();
    a.train(&data(1, 200).view(), &mut rng).unwrap();
    let state = a.optimizer_state().unwrap();

    let wide = EnsembleConfig { hidden: 8, ..cfg() };
    let mut b = ModelEnsemble::new(OBS, ACT, &wide, Some(&grad_cfg()), dev, DType::F32, &mut rng).unwrap();
    let err = b.restore_optimizer_state(Some(state.clone())).unwrap_err();
    assert!(matches!(err, Error::OptimizerState(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("shape") && !msg.contains('\n'), "{msg}");
    assert!(b.optimizer_state().is_none(), "nothing changed");

    let mut short = state.clone();
    short.v.pop();
    let err = a.restore_optimizer_state(Some(short)).unwrap_err().to_string();
    assert!(err.contains("moments") && !err.contains('\n'), "{err}");
    // The failed restore left a's own state in place.
    assert_eq!(a.optimizer_state().unwrap().step, state.step);
    a.restore_optimizer_state(None).unwrap();
    assert!(a.optimizer_state().is_none());
}
