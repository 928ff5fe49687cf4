//! The frozen view for the policy update (equation 11): gradients reach the inputs
//! exactly as through the ensemble itself, and none reach its parameters.
use candle_core::{DType, Device, Tensor, Var, backprop::GradStore};
use ddppo_models::{EnsembleConfig, ProbabilisticEnsemble};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const OBS: usize = 3;
const ACT: usize = 2;

fn model(dtype: DType) -> ProbabilisticEnsemble {
    let cfg = EnsembleConfig {
        ensemble_size: 4,
        elites: 3,
        hidden: 9,
        hidden_layers: 3,
        weight_decay: vec![1e-4; 4],
        ..Default::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut ens = ProbabilisticEnsemble::new(OBS, ACT, &cfg, &Device::Cpu, dtype, &mut rng).unwrap();
    ens.set_scaler(vec![0.1, -0.2, 0.3, 0.0, 0.5], vec![0.7, 1.3, 2.0, 0.9, 1.1]).unwrap();
    // Non-zero biases and log-variance bounds, so every parameter path matters.
    for v in ens.varmap().all_vars() {
        let n = v.elem_count();
        let noise: Vec<f64> = (0..n).map(|_| rng.random_range(-0.3..0.3)).collect();
        let noise = Tensor::from_vec(noise, v.dims(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
    ens
}

fn var(rng: &mut ChaCha8Rng, shape: &[usize], dtype: DType) -> Var {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
    Var::from_tensor(&t).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
    }
}

/// Gradients of a loss through `mean`, `sample` and `jvp` w.r.t. the inputs.
fn input_grads(ens: &ProbabilisticEnsemble, dtype: DType) -> (Vec<Vec<f64>>, GradStore) {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let b = 12;
    let obs = var(&mut rng, &[b, OBS], dtype);
    let act = var(&mut rng, &[b, ACT], dtype);
    let x = var(&mut rng, &[4, 3, OBS + ACT], dtype);
    let v = var(&mut rng, &[4, 3 * 2, OBS + ACT], dtype);
    let members: Vec<usize> = (0..b).map(|i| [0, 2, 1, 3][i % 4]).collect();
    let mean = ens.mean(obs.as_tensor(), act.as_tensor(), &members).unwrap();
    let mut noise_rng = ChaCha8Rng::seed_from_u64(6);
    let (sample, _) = ens.sample(obs.as_tensor(), act.as_tensor(), &members, &mut noise_rng).unwrap();
    let jv = ens.jvp(x.as_tensor(), v.as_tensor(), 2).unwrap();
    let loss = [
        (mean.reward * 0.7).unwrap().sum_all().unwrap(),
        mean.next_obs.sqr().unwrap().sum_all().unwrap(),
        sample.next_obs.sin().unwrap().sum_all().unwrap(),
        sample.reward.sum_all().unwrap(),
        jv.sqr().unwrap().sum_all().unwrap(),
    ]
    .into_iter()
    .reduce(|a, b| (a + b).unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let g = [&obs, &act, &x, &v].iter().map(|t| flat(grads.get(t.as_tensor()).expect("input gradient"))).collect();
    (g, grads)
}

#[test]
fn frozen_view_passes_input_gradients_and_none_to_the_parameters() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        for fused in [true, false] {
            let mut ens = model(dtype);
            ens.set_fused_kernels(fused);
            let frozen = ens.frozen();
            assert!(frozen.is_frozen() && !ens.is_frozen());
            let (want, grads) = input_grads(&ens, dtype);
            let (got, fgrads) = input_grads(&frozen, dtype);
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                close(a, b, tol, &format!("{dtype:?} fused {fused} input {i}"));
            }
            for v in ens.varmap().all_vars() {
                assert!(grads.get(v.as_tensor()).is_some(), "the ensemble trains");
                assert!(
                    fgrads.get(v.as_tensor()).is_none(),
                    "{dtype:?} fused {fused}: a parameter got a gradient through the frozen view"
                );
            }
        }
    }
}

#[test]
fn frozen_view_shares_the_weights() {
    let ens = model(DType::F32);
    let frozen = ens.frozen();
    let obs = Tensor::new(&[[0.1f32, 0.2, 0.3]], &Device::Cpu).unwrap();
    let act = Tensor::new(&[[0.0f32, -0.4]], &Device::Cpu).unwrap();
    let before = flat(&frozen.mean(&obs, &act, &[1]).unwrap().next_obs);
    assert_eq!(before, flat(&ens.mean(&obs, &act, &[1]).unwrap().next_obs));
    // An in-place update of the ensemble's weights shows through the view.
    for v in ens.varmap().all_vars() {
        v.set(&(v.as_tensor() * 1.5).unwrap()).unwrap();
    }
    let after = flat(&frozen.mean(&obs, &act, &[1]).unwrap().next_obs);
    assert_eq!(after, flat(&ens.mean(&obs, &act, &[1]).unwrap().next_obs));
    assert_ne!(before, after);
}
