//! Prediction and gradient model ensembles for DDPPO, on candle.
//!
//! Implements the model-learning half of the paper's section 4.3: the MBPO
//! probabilistic ensemble trained by Gaussian likelihood (the prediction model
//! `M^p`, equation 2) and the gradient model `M^g`, trained with the
//! directional-derivative loss `w * R` added (equations 9 and 10). `J · v` is
//! computed by forward-mode tangents written as ordinary tensor ops, so only
//! first-order autograd is needed. Both models are one type, [`ModelEnsemble`],
//! built with or without a [`GradientLossConfig`];
//! [`directional_derivative_loss`] computes equations 9 and 10. The rollout API
//! picks one elite per row and runs only that member on it (ALGORITHM.md
//! sections 2 and 3).
//!
//! CPU speed: on CPU each hidden layer is one fused autograd node (matmul, then
//! bias, SiLU and the tangent scaling in one pass, vectorised for AVX-512/AVX2),
//! and the output layer's product is an op of its own with the members spread
//! over threads.
//! With more neighbours than input dimensions the gradient loss propagates the
//! Jacobian's columns and contracts them with the neighbour directions, which is
//! cheaper than propagating the directions. Binaries should call
//! [`tune_allocator`] at start-up; on a small or shared machine also set
//! `RAYON_NUM_THREADS=1`, since candle's CPU thread pool spin-waits. The fused
//! kernels spread the members over their own threads instead ([`model_threads`],
//! [`ProbabilisticEnsemble::set_threads`]), and split a single member's rows over
//! persistent helper threads ([`split`]), with results independent of the count. The
//! criterion bench `ensemble_step` measures a training step at MBPO size; the
//! example `train_timing` whole training calls at the shapes of real runs.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use ddppo_models::{EnsembleConfig, ModelEnsemble, TransitionData};
//! use rand::SeedableRng;
//!
//! # fn main() -> ddppo_models::Result<()> {
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
//! let cfg = EnsembleConfig { ensemble_size: 3, elites: 2, hidden: 16, hidden_layers: 2,
//!     weight_decay: vec![0.0; 3], max_epochs: Some(2), ..Default::default() };
//! // `None`: the prediction model; `Some(&GradientLossConfig)` adds `w R`.
//! let mut model = ModelEnsemble::new(1, 1, &cfg, None, &Device::Cpu, DType::F32, &mut rng)?;
//! // s' = s + a, r = -s^2 on 64 random rows.
//! let obs: Vec<f32> = (0..64).map(|i| (i as f32 / 32.0) - 1.0).collect();
//! let act: Vec<f32> = (0..64).map(|i| ((i * 7 % 64) as f32 / 64.0) - 0.5).collect();
//! let rew: Vec<f32> = obs.iter().map(|s| -s * s).collect();
//! let next: Vec<f32> = obs.iter().zip(&act).map(|(s, a)| s + a).collect();
//! let data = TransitionData { obs: &obs, act: &act, rew: &rew, next_obs: &next };
//! let report = model.train(&data, &mut rng)?;
//! assert_eq!(report.holdout_mse.len(), 3);
//!
//! // One elite per row, then a sampled model step for 4 rows.
//! let ens = model.ensemble();
//! let members = ens.draw_elites(4, &mut rng);
//! let s = Tensor::new(&[[0.1f32], [0.2], [0.3], [0.4]], &Device::Cpu)?;
//! let a = Tensor::new(&[[0.0f32], [0.1], [0.0], [-0.1]], &Device::Cpu)?;
//! let (sample, mean) = ens.sample(&s, &a, &members, &mut rng)?;
//! assert_eq!(sample.next_obs.dims(), &[4, 1]);
//! assert_eq!(mean.reward.dims(), &[4]);
//! # Ok(())
//! # }
//! ```

mod adam;
mod config;
mod ensemble;
mod fused;
pub mod gemm_bound;
mod layer;
pub mod split;
mod train;
pub mod transfer;

pub use adam::{ModelOptimizer, OptimizerState};
pub use config::{EnsembleConfig, GradientLossConfig};
pub use ensemble::{EnsembleSnapshot, MemberGroups, ModelStep, ProbabilisticEnsemble, softplus};
pub use layer::EnsembleLinear;
pub use train::{
    COLD_START_DROP, DirectionalDerivativeLoss, EpochStats, LossBatch, LossTerms, ModelEnsemble, NeighbourBatch,
    TrainReport, TrainingSnapshot, TransitionData, directional_derivative_loss,
};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad model config: {field}: {reason}")]
    Config { field: String, reason: String },
    #[error("bad model input: {0}")]
    Data(String),
    #[error("non-finite training loss (member {}) in epoch {epoch}; weights restored to those before this training call", member.map_or("?".to_string(), |m| m.to_string()))]
    NonFinite { member: Option<usize>, epoch: usize },
    #[error("model checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },
    #[error("optimizer state: {0}")]
    OptimizerState(String),
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("training interrupted")]
    Interrupted,
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The default thread count of a new ensemble's CPU kernels
/// ([`ProbabilisticEnsemble::set_threads`]): `DDPPO_MODEL_THREADS` when set (a
/// positive integer), else the machine's cores. These are plain threads started
/// per kernel call, not rayon's spin-waiting pool, so they do not slow other
/// work on a busy machine while idle; the members are split over them, so the
/// results do not depend on the count. Measured on the idle 2-core machine
/// (`ddppo profile --env hopper --rows 5000 --max-epochs 3`, two A/B pairs):
/// 2 threads take 0.70x the model-training time of 1, although the two
/// ensembles already train on two threads.
///
/// The same count bounds the [`split`] helpers (`count - 1` of them, started
/// once), over which one member's products and activations (a rollout's or
/// policy update's rows of one elite) and the `ddppo-agent` SAC networks'
/// products are split, again with results independent of the count.
pub fn model_threads() -> Result<usize> {
    match std::env::var("DDPPO_MODEL_THREADS") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(Error::Config {
                field: "DDPPO_MODEL_THREADS".into(),
                reason: format!("must be a positive integer, got {v:?}"),
            }),
        },
        Err(_) => Ok(std::thread::available_parallelism().map_or(1, usize::from)),
    }
}

/// The largest `M_MMAP_THRESHOLD` glibc's `mallopt` accepts on 64-bit targets
/// (half its per-thread heap size, `DEFAULT_MMAP_THRESHOLD_MAX`); a larger value
/// is refused and leaves the default in place.
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// How much free memory at the top of a heap glibc keeps instead of returning it
/// to the kernel ([`tune_allocator`]).
pub const TRIM_THRESHOLD: usize = 1 << 30;

/// glibc's `M_TOP_PAD` as [`tune_allocator`] sets it: the size of a thread
/// arena's heaps (`HEAP_MAX_SIZE`, twice the largest mmap threshold on 64-bit
/// targets). glibc unmaps a thread arena's heap that comes free only if the
/// heap below it has room for this pad on top of its own free top; a 64 MiB
/// heap never has, so no heap is unmapped.
pub const TOP_PAD: usize = 64 << 20;

/// Allocator tuning for candle on CPU (Linux/glibc only; a no-op elsewhere).
/// The `ddppo` binary calls it first thing; a binary of your own that trains
/// the ensembles should too.
///
/// A training step allocates its large intermediate tensors afresh (Hopper's
/// gradient ensemble: 4,096 stacked rows x 200 x 7 members, 23 MB each) and
/// frees them together at its end. With glibc's defaults that memory goes back
/// to the kernel and every step pays the page faults and zeroing of all its
/// tensors again: buffers above the dynamic `M_MMAP_THRESHOLD` are a fresh
/// `mmap` each, a heap top freed beyond `M_TRIM_THRESHOLD` is trimmed, and a
/// thread's arena (a run trains the two ensembles on two threads) unmaps each
/// of its 64 MiB heaps once it is free, whatever the trim threshold. This sets
/// the mmap threshold to [`MMAP_THRESHOLD`] (the largest glibc accepts), the
/// trim threshold to [`TRIM_THRESHOLD`] and the top pad to [`TOP_PAD`] (which
/// keeps a thread arena's free heaps mapped): freed buffers are reused.
///
/// The threads keep their own arenas (glibc's default). An earlier version
/// kept the heaps by putting every thread on the main heap (`M_ARENA_MAX` 1)
/// instead; the per-step updates then spent much of their time waiting for
/// that one arena's lock, since the calling thread and the [`split`] helper
/// allocate the small tensors of a policy or critic update at the same time.
/// Measured on the idle 2-core Intel Xeon, `ddppo profile --env ant --rows
/// 5000 --max-epochs 5 --update-steps 30`, `RAYON_NUM_THREADS=1`, two A/B
/// pairs, one arena against this: seconds per env step of policy updates
/// 0.187, 0.188 -> 0.137, 0.139 (0.73x), of critic updates 0.028 -> 0.024;
/// model training 8.3, 8.4 s -> 8.3, 8.0 s; the 100,000-row rollout 0.44,
/// 0.46 s -> 0.57, 0.50 s (it runs once per model training). Hopper
/// (`--max-epochs 3 --update-steps 20`): policy 0.116, 0.119 -> 0.087, 0.089;
/// model training 9.5, 9.8 s -> 9.7, 9.4 s, against 11.2, 11.8 s (system time
/// 3.1, 4.4 s) with thread arenas but without the top pad. Call once at
/// start-up. Returns whether glibc accepted all three values.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called with valid
        // option constants and has no memory-safety preconditions.
        unsafe {
            let a = libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
            let b = libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int);
            let c = libc::mallopt(libc::M_TOP_PAD, TOP_PAD as libc::c_int);
            a == 1 && b == 1 && c == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
