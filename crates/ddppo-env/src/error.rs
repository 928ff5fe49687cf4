//! The crate's one error type.
use std::path::PathBuf;

/// Everything that can go wrong in `ddppo-env`; each variant prints as one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown env `{name}`; valid names: {valid}")]
    UnknownTask { name: String, valid: String },
    #[error("action has {got} components, {task} expects {expected}")]
    ActionLength { task: &'static str, expected: usize, got: usize },
    #[error("action component {index} is {value}; actions must be finite")]
    NonFiniteAction { index: usize, value: f64 },
    #[error("{what} has {got} values, {task} expects {expected}")]
    StateLength { task: &'static str, what: &'static str, expected: usize, got: usize },
    #[error("{what} component {index} is {value}; states must be finite")]
    NonFiniteState { what: &'static str, index: usize, value: f64 },
    #[error("{task} needs MuJoCo, but ddppo-env was built without its `mujoco` feature")]
    MujocoDisabled { task: &'static str },
    #[error("{task} is not a MuJoCo task")]
    NotMujoco { task: &'static str },
    #[error(
        "MuJoCo model assets not found: {path} does not exist; run `cargo xtask setup` \
         or point DDPPO_ASSETS_DIR at a directory holding gymnasium's model XMLs"
    )]
    AssetsMissing { path: PathBuf },
    #[error("loading MuJoCo model {path}: {msg}")]
    ModelLoad { path: PathBuf, msg: String },
    #[error("linear system: {0}")]
    LinearSystem(String),
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Replay(String),
    #[error("{0}")]
    JacobianInput(String),
    #[error("evaluation: {0}")]
    Evaluation(String),
    #[error("saved {task} env state is invalid: {msg}")]
    SavedState { task: &'static str, msg: String },
    /// MuJoCo met a NaN, infinite or huge (> 1e10) value in the state, its
    /// acceleration or the control, and reset the simulation: the step's
    /// result would be meaningless. The env must be reset before it steps again.
    #[error(
        "the {task} simulation diverged at step {step} of the episode: MuJoCo found a NaN, infinite or huge value \
         in {quantity} (index {index}) and reset the state"
    )]
    SimulationDiverged { task: &'static str, step: usize, quantity: &'static str, index: i32 },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
