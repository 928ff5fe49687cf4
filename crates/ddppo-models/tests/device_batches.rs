//! The device-resident training path (the default off the CPU), run on the CPU:
//! it makes no host round trip per minibatch, and it trains exactly as the
//! host path does.
use candle_core::{DType, Device};
use ddppo_models::{EnsembleConfig, GradientLossConfig, ModelEnsemble, TrainReport, TransitionData, transfer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const OBS: usize = 3;
const ACT: usize = 2;
const ROWS: usize = 120;
const EPOCHS: usize = 4;

struct Data {
    obs: Vec<f32>,
    act: Vec<f32>,
    rew: Vec<f32>,
    next: Vec<f32>,
}

fn data() -> Data {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let obs: Vec<f32> = (0..ROWS * OBS).map(|_| rng.random_range(-1.0..1.0)).collect();
    let act: Vec<f32> = (0..ROWS * ACT).map(|_| rng.random_range(-1.0..1.0)).collect();
    let rew: Vec<f32> = (0..ROWS).map(|r| -obs[r * OBS] * obs[r * OBS] + act[r * ACT]).collect();
    let next: Vec<f32> = (0..ROWS * OBS).map(|i| obs[i] + 0.1 * act[(i / OBS) * ACT] * (1 + i % OBS) as f32).collect();
    Data { obs, act, rew, next }
}

/// Trains a gradient ensemble (both loss terms) for exactly `EPOCHS` epochs;
/// returns the report, the host-device copies it made and its parameters.
fn train(device_batches: bool, batch_size: usize) -> (TrainReport, u64, Vec<Vec<f32>>) {
    train_drawing(device_batches, batch_size, 0)
}

/// As [`train`], with `gradient.directions_per_step = directions`.
fn train_drawing(device_batches: bool, batch_size: usize, directions: usize) -> (TrainReport, u64, Vec<Vec<f32>>) {
    let cfg = EnsembleConfig {
        ensemble_size: 3,
        elites: 2,
        hidden: 8,
        hidden_layers: 2,
        weight_decay: vec![1e-4; 3],
        batch_size,
        max_epochs: Some(EPOCHS),
        patience: EPOCHS + 1,
        ..Default::default()
    };
    // k = 6 > in = 5: the Jacobian-column branch of the gradient loss.
    let grad = GradientLossConfig {
        neighbours: 6,
        neighbour_set: 80,
        weight: 1.0,
        directions_per_step: directions,
        ..Default::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut model = ModelEnsemble::new(OBS, ACT, &cfg, Some(&grad), &Device::Cpu, DType::F32, &mut rng).unwrap();
    model.ensemble_mut().set_device_batches(device_batches);
    let d = data();
    let td = TransitionData { obs: &d.obs, act: &d.act, rew: &d.rew, next_obs: &d.next };
    let before = transfer::copies();
    let report = model.train(&td, &mut rng).unwrap();
    let copies = transfer::copies() - before;
    let mut params: Vec<(String, Vec<f32>)> = model
        .ensemble()
        .varmap()
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    (report, copies, params.into_iter().map(|p| p.1).collect())
}

#[test]
fn device_batches_copy_per_epoch_not_per_minibatch() {
    // 96 training rows (20% held out): one minibatch of 256 or ten of 10.
    let (one, copies_one, _) = train(true, 256);
    let (many, copies_many, _) = train(true, 10);
    assert_eq!((one.epochs, many.epochs), (EPOCHS, EPOCHS));
    // Per training: the scaler (2), the holdout split (2), the data (2); per
    // epoch: the epoch's row indices, the loss sums, the holdout MSE.
    assert_eq!(copies_one, 6 + 3 * EPOCHS as u64);
    assert_eq!(copies_many, copies_one, "a minibatch made a host-device copy");
    // The host path, by contrast, uploads each minibatch and reads its loss back.
    let (_, host_many, _) = train(false, 10);
    assert!(host_many >= copies_many + 10 * EPOCHS as u64 * 3, "host path: {host_many} copies");
}

#[test]
fn device_batches_train_exactly_as_the_host_path() {
    for batch_size in [256, 10] {
        let (host, _, host_params) = train(false, batch_size);
        let (dev, _, dev_params) = train(true, batch_size);
        // Same draws, same minibatches to the last bit, same updates.
        assert_eq!(dev_params, host_params, "batch size {batch_size}");
        assert_eq!(dev.holdout_mse, host.holdout_mse);
        assert_eq!(dev.train_loss, host.train_loss);
        // The mean R is summed in another order (per member over the epoch).
        let (a, b) = (dev.derivative_loss.unwrap(), host.derivative_loss.unwrap());
        assert!((a - b).abs() <= 1e-12 * b.abs(), "{a} vs {b}");
    }
}

/// `gradient.directions_per_step`: `m = n` is the default computation to the
/// last bit (no extra draws); `m < n` trains otherwise, and the device path
/// draws the same neighbours as the host path.
#[test]
fn drawn_directions_train_alike_on_host_and_device() {
    let (_, _, all) = train_drawing(false, 10, 0);
    let (_, _, n) = train_drawing(false, 10, 6);
    assert_eq!(n, all, "m = n must be the default computation");
    let (host, _, host_params) = train_drawing(false, 10, 2);
    let (dev, _, dev_params) = train_drawing(true, 10, 2);
    assert_ne!(host_params, all, "m = 2 of 6 must change the training");
    assert_eq!(dev_params, host_params);
    assert_eq!(dev.train_loss, host.train_loss);
    let (a, b) = (dev.derivative_loss.unwrap(), host.derivative_loss.unwrap());
    assert!(b.is_finite() && (a - b).abs() <= 1e-12 * b.abs(), "{a} vs {b}");
}
