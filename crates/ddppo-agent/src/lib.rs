//! The agent of DDPPO (ICLR 2022): the SAC critic, the policy update that
//! back-propagates through a learned model, model rollouts for the critic's
//! data, and the training loop with every variant (ALGORITHM.md sections 1,
//! 4, 5 and 6; the paper's Algorithm 1, section 4.3 and equations 11-13).
//!
//! - [`sac`]: tanh-Gaussian policy, twin Q with targets (equation 12),
//!   learned temperature (equation 13).
//! - [`rollout`]: [`ModelEnv`], the one place that picks an elite, samples
//!   and terminates, for the critic's `k`-step rollouts into `D_model` and the
//!   policy update's `H` steps (values from the rollout model, derivatives
//!   from the gradient model via `sg(p) + g - sg(g)`).
//! - [`variant`]: the table of variants ([`Variant::spec`]).
//! - [`policy_update`]: equation 11 and its adjoint-recursion check.
//! - [`config`] and [`agent`]: the typed config (presets in `configs/`) and
//!   the loop of Algorithm 1, [`Agent::train`], the one `ddppo train` runs.
//! - [`run_state`] and [`params`]: a run's state as one serialisable
//!   [`RunState`], its networks and optimiser states as one [`ParamTree`];
//!   [`checkpoint`] writes both whole.
//! - [`jacobian_error`]: the models' Jacobian error against the true step
//!   Jacobians on fixed held-out states, logged at every evaluation.
//! - [`policy_probe`]: what drives the policy update (its gradient split into
//!   model-reward, terminal-Q and entropy parts) and the action cost the
//!   models predict against the true one, logged at every evaluation.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use ddppo_agent::sac::{GaussianPolicy, SacCritic, critic_target};
//! use rand::SeedableRng;
//!
//! # fn main() -> ddppo_agent::Result<()> {
//! let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
//! let dev = Device::Cpu;
//! let policy = GaussianPolicy::new(3, &[-2.0], &[2.0], &[16, 16], DType::F32, &dev, &mut rng)?;
//! let critic = SacCritic::new(3, 1, &[16, 16], DType::F32, &dev, &mut rng)?;
//! let s = Tensor::zeros((4, 3), DType::F32, &dev)?;
//! let a = policy.sample(&s, &mut rng)?; // reparameterised, actions inside [-2, 2]
//! let q = critic.target_min_q(&s, &a.action)?;
//! let r = Tensor::ones(4, DType::F32, &dev)?;
//! let y = critic_target(&r, &r, &q, &a.logp, 0.2, 0.99)?; // equation 12's target
//! assert_eq!(y.dims(), &[4]);
//!
//! // A whole run is `Agent::new(config)?.train(Some(&checkpoints), &mut observer)`:
//! let cfg = ddppo_agent::AgentConfig::preset("inverted-pendulum")?;
//! assert_eq!((cfg.horizon, cfg.gradient.neighbours), (3, 10));
//! # Ok(())
//! # }
//! ```

pub mod agent;
pub mod checkpoint;
pub mod config;
pub mod device_check;
pub mod error;
mod fused;
pub mod grad_error;
pub mod jacobian_error;
pub mod nn;
pub mod params;
pub mod policy_probe;
pub mod policy_update;
pub mod profile;
pub mod rollout;
pub mod run_state;
pub mod sac;
pub mod variant;

pub use agent::{Agent, EvalRecord, EvalSummary, NoObserver, Observer, ObserverError, PhaseTimes, evaluate_policy};
pub use checkpoint::Checkpoints;
pub use config::{AgentConfig, IntoValidConfig, Overrides, RolloutSchedule, ValidConfig, Variant};
pub use error::{Error, Result};
pub use params::ParamTree;
pub use rollout::{DynamicsModel, ModelEnv};
pub use run_state::RunState;
pub use variant::{GradientSource, PolicyUpdate, RolloutModel, VariantSpec};
