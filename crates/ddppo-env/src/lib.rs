//! MuJoCo tasks with MuJoCo-v2 semantics and analytic envs with exact
//! Jacobians: the environments of DDPPO (paper section 5 and appendix B;
//! ALGORITHM.md section 8).
//!
//! - [`Task`] names the eight envs; [`make`] builds one behind the [`Env`] trait.
//! - The six MuJoCo tasks ([`MujocoEnv`], feature `mujoco`, on by default)
//!   follow gym's v2 envs: healthy bonus on every step, no contact cost,
//!   Ant and Humanoid observations truncated to `qpos[2:] + qvel`.
//! - [`is_terminal`] is the termination function applied to model
//!   predictions during model rollouts; it needs no simulator.
//! - [`Pendulum`] and [`LinearEnv`] implement [`AnalyticDynamics`]: exact
//!   `(r, s')` and Jacobians `d(r, s')/d(s, a)` for the gradient-error study.
//! - [`StepJacobian`] ([`make_jacobian`]) gives the true Jacobian
//!   `d(r, obs')/d(obs, a)` of one env step of any task: exact for the
//!   analytic envs, central differences through the step for MuJoCo's.
//! - [`evaluate`] runs evaluation episodes on worker threads;
//!   [`replay::replay`] applies recorded actions from a given state.
//!
//! ```
//! use ddppo_env::{make, AnalyticDynamics, Env, Pendulum, Task};
//!
//! let mut env = make(Task::Pendulum)?;
//! let obs = env.reset(7);
//! let step = env.step(&[0.5])?;
//! assert_eq!(step.obs.len(), obs.len());
//!
//! // The analytic dynamics give the same transition and its Jacobian.
//! let pendulum = Pendulum::new();
//! let (reward, next) = pendulum.transition(&obs, &[0.5]);
//! assert_eq!((reward, next), (step.reward, step.obs));
//! let jac = pendulum.jacobian(&obs, &[0.5]); // (1 + 2) x (2 + 1)
//! assert_eq!(jac.len(), 9);
//!
//! // Bad input is an error, not a panic.
//! assert!(env.step(&[f64::NAN]).is_err());
//! assert!(Task::from_name("cheetah").is_err());
//! # Ok::<(), ddppo_env::Error>(())
//! ```

mod analytic;
mod error;
mod jacobian;
#[cfg(feature = "mujoco")]
mod mujoco_env;
pub mod replay;
mod runner;
mod task;
mod termination;

pub use analytic::{AnalyticDynamics, LinearEnv, LinearSystem, Pendulum};
pub use error::{Error, Result};
#[cfg(feature = "mujoco")]
pub use jacobian::MujocoJacobian;
pub use jacobian::{FD_STEP, JacobianInput, StepJacobian, make_jacobian};
#[cfg(feature = "mujoco")]
pub use mujoco_env::{MujocoEnv, MujocoModel, assets_dir};
pub use runner::{EnvFactory, EpisodeStats, evaluate, evaluate_episodes};
pub use task::Task;
pub use termination::is_terminal;

/// What one step returns (gymnasium's `(obs, reward, terminated, truncated)`).
#[derive(Clone, Debug, PartialEq)]
pub struct StepResult {
    pub obs: Vec<f64>,
    pub reward: f64,
    /// The task's own termination (the agent fell, the pole tipped over).
    pub terminated: bool,
    /// The episode hit its step limit ([`Env::max_episode_steps`]).
    pub truncated: bool,
}

/// An environment: reset from a seed, step with an action.
pub trait Env: Send {
    fn obs_dim(&self) -> usize;
    fn act_dim(&self) -> usize;
    fn action_low(&self) -> &[f64];
    fn action_high(&self) -> &[f64];
    /// Steps after which [`StepResult::truncated`] is set (1000 for the MuJoCo tasks).
    fn max_episode_steps(&self) -> usize;
    /// A fresh episode; the same seed gives the same initial observation.
    fn reset(&mut self, seed: u64) -> Vec<f64>;
    /// Advances one step. An action of the wrong length or with a non-finite
    /// component is an error and leaves the env untouched. A simulation that
    /// diverges is [`Error::SimulationDiverged`], after which the env must be
    /// reset.
    fn step(&mut self, action: &[f64]) -> Result<StepResult>;
    /// Everything the next steps depend on (state, step count, simulator
    /// internals), for checkpoints: after [`Env::restore_state`] of it, the env
    /// steps bit for bit as the one it was saved from.
    fn save_state(&self) -> Vec<f64>;
    /// Restores what [`Env::save_state`] returned (of an env of the same task);
    /// a vector of the wrong length or with a non-finite value is an error and
    /// leaves the env untouched.
    fn restore_state(&mut self, state: &[f64]) -> Result<()>;
}

/// The step count stored as the first element of a saved env state.
pub(crate) fn saved_steps(task: &'static str, state: &[f64], expected: usize) -> Result<usize> {
    let bad = |msg: String| Err(Error::SavedState { task, msg });
    if state.len() != expected {
        return bad(format!("{} values, expected {expected}", state.len()));
    }
    if let Some((index, value)) = state.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return bad(format!("value {index} is {value}"));
    }
    let steps = state[0];
    if steps < 0.0 || steps.fract() != 0.0 {
        return bad(format!("step count {steps} is not a whole number"));
    }
    Ok(steps as usize)
}

/// Builds the env of `task` (`Linear` with the default [`LinearSystem`]).
///
/// For many envs of one MuJoCo task, load the model once with
/// [`MujocoModel::load`] and call [`MujocoModel::make_env`] instead.
pub fn make(task: Task) -> Result<Box<dyn Env>> {
    match task {
        Task::Pendulum => Ok(Box::new(Pendulum::new())),
        Task::Linear => Ok(Box::new(LinearEnv::new(LinearSystem::default())?)),
        #[cfg(feature = "mujoco")]
        _ => Ok(Box::new(MujocoModel::load(task)?.make_env())),
        #[cfg(not(feature = "mujoco"))]
        _ => Err(Error::MujocoDisabled { task: task.name() }),
    }
}

/// Length and finiteness of an action.
pub(crate) fn check_action(task: &'static str, action: &[f64], expected: usize) -> Result<()> {
    if action.len() != expected {
        return Err(Error::ActionLength { task, expected, got: action.len() });
    }
    if let Some((index, &value)) = action.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFiniteAction { index, value });
    }
    Ok(())
}
