//! The rollout API, checkpoints, config validation and non-finite recovery.
use candle_core::{DType, Device, Tensor};
use ddppo_models::{EnsembleConfig, Error, GradientLossConfig, ModelEnsemble, ProbabilisticEnsemble, TransitionData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn cfg() -> EnsembleConfig {
    EnsembleConfig {
        ensemble_size: 4,
        elites: 3,
        hidden: 8,
        hidden_layers: 2,
        weight_decay: vec![1e-4; 3],
        ..Default::default()
    }
}

fn rows(rng: &mut ChaCha8Rng, b: usize, d: usize) -> Tensor {
    let v: Vec<f32> = (0..b * d).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, (b, d), &Device::Cpu).unwrap()
}

#[test]
fn grouped_rollout_equals_each_member_alone_and_is_seed_deterministic() {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let ens = ProbabilisticEnsemble::new(3, 2, &cfg(), &Device::Cpu, DType::F32, &mut rng).unwrap();
    let (obs, act) = (rows(&mut rng, 50, 3), rows(&mut rng, 50, 2));
    let members = ens.draw_elites(50, &mut rng);
    assert!(members.iter().all(|m| ens.elites().contains(m)));
    let distinct: std::collections::BTreeSet<_> = members.iter().collect();
    assert!(distinct.len() > 1, "50 draws over 3 elites should use several");
    let grouped = ens.mean(&obs, &act, &members).unwrap();
    let gr = grouped.next_obs.to_vec2::<f32>().unwrap();
    let rr = grouped.reward.to_vec1::<f32>().unwrap();
    for (row, &m) in members.iter().enumerate() {
        let o = obs.narrow(0, row, 1).unwrap();
        let a = act.narrow(0, row, 1).unwrap();
        let alone = ens.mean(&o, &a, &[m]).unwrap();
        let an = alone.next_obs.to_vec2::<f32>().unwrap();
        for j in 0..3 {
            assert!((an[0][j] - gr[row][j]).abs() < 1e-5, "row {row}");
        }
        assert!((alone.reward.to_vec1::<f32>().unwrap()[0] - rr[row]).abs() < 1e-5);
    }
    // Same seed -> same draws and same samples.
    let draw = |seed| {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        let m = ens.draw_elites(50, &mut r);
        let (s, _) = ens.sample(&obs, &act, &m, &mut r).unwrap();
        (m, s.next_obs.to_vec2::<f32>().unwrap())
    };
    assert_eq!(draw(7), draw(7));
    assert_ne!(draw(7).1, draw(8).1);
}

#[test]
fn mean_is_differentiable_in_obs_and_act() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let ens = ProbabilisticEnsemble::new(3, 2, &cfg(), &Device::Cpu, DType::F32, &mut rng).unwrap();
    let obs = candle_core::Var::from_tensor(&rows(&mut rng, 6, 3)).unwrap();
    let act = candle_core::Var::from_tensor(&rows(&mut rng, 6, 2)).unwrap();
    let members = vec![0, 1, 2, 0, 1, 2];
    let step = ens.mean(obs.as_tensor(), act.as_tensor(), &members).unwrap();
    let loss = (step.reward.sum_all().unwrap() + step.next_obs.sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let ga = grads.get(act.as_tensor()).expect("gradient reaches the actions");
    let go = grads.get(obs.as_tensor()).expect("gradient reaches the states");
    assert_eq!(ga.dims(), &[6, 2]);
    assert!(go.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
}

#[test]
fn checkpoint_roundtrip_and_wrong_shape_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("ddppo-models-ck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ens.safetensors");
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut a = ProbabilisticEnsemble::new(3, 2, &cfg(), &Device::Cpu, DType::F32, &mut rng).unwrap();
    a.set_scaler(vec![0.5; 5], vec![2.0; 5]).unwrap();
    a.save(&path).unwrap();
    let mut b = ProbabilisticEnsemble::new(3, 2, &cfg(), &Device::Cpu, DType::F32, &mut rng).unwrap();
    let (obs, act) = (rows(&mut rng, 5, 3), rows(&mut rng, 5, 2));
    let before = b.mean(&obs, &act, &[0; 5]).unwrap().next_obs.to_vec2::<f32>().unwrap();
    b.load(&path).unwrap();
    let want = a.mean(&obs, &act, &[0; 5]).unwrap().next_obs.to_vec2::<f32>().unwrap();
    let got = b.mean(&obs, &act, &[0; 5]).unwrap().next_obs.to_vec2::<f32>().unwrap();
    assert_eq!(want, got);
    assert_ne!(before, got);
    assert_eq!(b.scaler().1, &[2.0; 5]);
    assert_eq!(b.elites(), a.elites());

    let mut other = ProbabilisticEnsemble::new(4, 2, &cfg(), &Device::Cpu, DType::F32, &mut rng).unwrap();
    let err = other.load(&path).unwrap_err().to_string();
    assert!(err.contains("obs_dim 3") && !err.contains('\n'), "{err}");
    let wide = EnsembleConfig { hidden: 9, ..cfg() };
    let mut other = ProbabilisticEnsemble::new(3, 2, &wide, &Device::Cpu, DType::F32, &mut rng).unwrap();
    assert!(matches!(other.load(&path), Err(Error::Checkpoint { .. })));
    std::fs::write(dir.join("junk"), b"not a tensor file").unwrap();
    assert!(matches!(b.load(dir.join("junk")), Err(Error::Checkpoint { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn configs_are_validated_with_named_fields() {
    let bad = [
        (EnsembleConfig { ensemble_size: 0, ..Default::default() }, "ensemble_size"),
        (EnsembleConfig { elites: 8, ..Default::default() }, "elites"),
        (EnsembleConfig { lr: -1e-3, ..Default::default() }, "lr"),
        (EnsembleConfig { weight_decay: vec![0.0; 2], ..Default::default() }, "weight_decay"),
        (EnsembleConfig { holdout_ratio: 1.0, ..Default::default() }, "holdout_ratio"),
        (EnsembleConfig { batch_size: 0, ..Default::default() }, "batch_size"),
    ];
    for (c, field) in bad {
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{err}");
    }
    assert!(EnsembleConfig::default().validate().is_ok());
    let g = GradientLossConfig { neighbours: 0, ..Default::default() };
    assert!(g.validate().unwrap_err().to_string().contains("neighbours"));
    let g = GradientLossConfig { weight: f64::NAN, ..Default::default() };
    assert!(g.validate().unwrap_err().to_string().contains("weight"));
    // Unknown keys are refused.
    assert!(serde_json::from_str::<EnsembleConfig>(r#"{"hiden": 3}"#).is_err());
    let parsed: EnsembleConfig = serde_json::from_str(r#"{"hidden": 3}"#).unwrap();
    assert_eq!(parsed.hidden, 3);
    assert_eq!(parsed.ensemble_size, 7);
}

#[test]
fn non_finite_loss_stops_training_and_keeps_previous_weights() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut model = ModelEnsemble::new(1, 1, &cfg(), None, &Device::Cpu, DType::F32, &mut rng).unwrap();
    let n = 40;
    let obs: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
    let act = obs.clone();
    // Rewards of 1e30 overflow the f32 squared error.
    let rew = vec![1e30f32; n];
    let next = obs.clone();
    let before: Vec<Vec<f32>> = snapshot(model.ensemble());
    let data = TransitionData { obs: &obs, act: &act, rew: &rew, next_obs: &next };
    let err = model.train(&data, &mut rng).unwrap_err();
    assert!(matches!(err, Error::NonFinite { member: Some(_), epoch: 1 }), "{err}");
    assert!(err.to_string().contains("epoch 1"));
    let after = snapshot(model.ensemble());
    assert_eq!(before, after, "weights restored");
    assert!(after.iter().flatten().all(|v| v.is_finite()));
    // Mismatched columns are a clear error, not a panic.
    let short = TransitionData { obs: &obs[..10], act: &act, rew: &rew, next_obs: &next };
    assert!(matches!(model.train(&short, &mut rng), Err(Error::Data(_))));
}

fn snapshot(ens: &ProbabilisticEnsemble) -> Vec<Vec<f32>> {
    let data = ens.varmap().data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    names.iter().map(|k| data[k].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

/// `n` transitions of a smooth 2-d system with one action: obs, act, rew, next obs.
fn smooth_transitions(rng: &mut ChaCha8Rng, n: usize) -> [Vec<f32>; 4] {
    let obs: Vec<f32> = (0..2 * n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let act: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let rew: Vec<f32> = (0..n).map(|r| -obs[2 * r] * obs[2 * r] + 0.5 * act[r]).collect();
    let next: Vec<f32> = (0..2 * n).map(|i| obs[i] + 0.2 * (act[i / 2] - obs[i]).sin()).collect();
    [obs, act, rew, next]
}

/// `model.max_epochs = N`: a training call stops after N epochs although the
/// patience would let it go on, and still ends on each member's best weights
/// by MBPO's rule (its snapshot), not on the last epoch's.
#[test]
fn max_epochs_caps_training_and_keeps_the_best_weights() {
    let (cap, improvement, members) = (6, 0.3, 4);
    let c = EnsembleConfig { max_epochs: Some(cap), patience: 100, improvement, batch_size: 16, ..cfg() };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut model = ModelEnsemble::new(2, 1, &c, None, &Device::Cpu, DType::F32, &mut rng).unwrap();
    let [obs, act, rew, next] = smooth_transitions(&mut rng, 200);
    let data = TransitionData { obs: &obs, act: &act, rew: &rew, next_obs: &next };
    let (probe_obs, probe_act) = (rows(&mut rng, 5, 2), rows(&mut rng, 5, 1));
    // Member m's mean predictions on fixed rows, as bits.
    let predict = |ens: &ProbabilisticEnsemble, m: usize| -> Vec<u32> {
        let step = ens.mean(&probe_obs, &probe_act, &[m; 5]).unwrap();
        let mut v = step.reward.to_vec1::<f32>().unwrap();
        v.extend(step.next_obs.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        v.into_iter().map(f32::to_bits).collect()
    };
    let mut epochs: Vec<(Vec<f64>, Vec<Vec<u32>>)> = Vec::new();
    let report = model
        .train_with(&data, &mut rng, &mut |ens, st| {
            epochs.push((st.holdout_mse.clone(), (0..members).map(|m| predict(ens, m)).collect()));
            Ok(())
        })
        .unwrap();
    assert_eq!((report.epochs, epochs.len()), (cap, cap));
    let mut restored_earlier = false;
    for m in 0..members {
        let (mut best, mut best_epoch) = (f64::INFINITY, 0);
        for (i, (mse, _)) in epochs.iter().enumerate() {
            let gain = if best.is_finite() { (best - mse[m]) / best } else { f64::INFINITY };
            if gain > improvement {
                (best, best_epoch) = (mse[m], i);
            }
        }
        assert_eq!(report.holdout_mse[m], best, "member {m}");
        assert_eq!(predict(model.ensemble(), m), epochs[best_epoch].1[m], "member {m}: best weights restored");
        restored_earlier |= best_epoch < cap - 1;
    }
    assert!(restored_earlier, "some member's best epoch should come before the last");
}

/// `model.warm_max_epochs = N`: the first (cold) training call is not held
/// to N (here it runs to `max_epochs` = 12); every later call on the same ensemble (warm:
/// its Adam state kept) stops after N; `max_epochs`, where smaller, still
/// caps both.
#[test]
fn warm_max_epochs_caps_warm_trainings_only() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let [obs, act, rew, next] = smooth_transitions(&mut rng, 200);
    let data = TransitionData { obs: &obs, act: &act, rew: &rew, next_obs: &next };
    let epochs_of = |c: &EnsembleConfig, rng: &mut ChaCha8Rng| -> Vec<usize> {
        let mut model = ModelEnsemble::new(2, 1, c, None, &Device::Cpu, DType::F32, rng).unwrap();
        (0..3).map(|_| model.train(&data, rng).unwrap().epochs).collect()
    };
    let base = EnsembleConfig { patience: 100, improvement: 0.0, batch_size: 16, max_epochs: Some(12), ..cfg() };
    let warm = EnsembleConfig { warm_max_epochs: Some(3), ..base.clone() };
    assert_eq!(epochs_of(&warm, &mut rng), vec![12, 3, 3]);
    assert_eq!(epochs_of(&base, &mut rng), vec![12, 12, 12]);
    let both = EnsembleConfig { max_epochs: Some(2), ..warm };
    assert_eq!(epochs_of(&both, &mut rng), vec![2, 2, 2]);
    let zero = EnsembleConfig { warm_max_epochs: Some(0), ..cfg() };
    assert!(zero.validate().unwrap_err().to_string().contains("warm_max_epochs"));
}
