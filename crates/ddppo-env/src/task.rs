//! The tasks by name, with their dimensions.
use crate::error::{Error, Result};

/// One of the environments this crate provides (ALGORITHM.md section 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Task {
    InvertedPendulum,
    Hopper,
    Walker2d,
    HalfCheetah,
    /// Ant with the observation truncated to `qpos[2:] + qvel` (27).
    Ant,
    /// Humanoid with the observation truncated to `qpos[2:] + qvel` (45).
    Humanoid,
    /// gym's pendulum dynamics on the state `(theta, theta_dot)`.
    Pendulum,
    /// `s' = A s + B a` from a [`crate::LinearSystem`].
    Linear,
}

impl Task {
    /// Every task, MuJoCo ones first.
    pub const ALL: [Task; 8] = [
        Task::InvertedPendulum,
        Task::Hopper,
        Task::Walker2d,
        Task::HalfCheetah,
        Task::Ant,
        Task::Humanoid,
        Task::Pendulum,
        Task::Linear,
    ];

    /// Parses a task name as used by the CLI and the configs (`half-cheetah`, ...).
    pub fn from_name(name: &str) -> Result<Task> {
        Task::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .ok_or_else(|| Error::UnknownTask { name: name.to_string(), valid: Task::ALL.map(Task::name).join(", ") })
    }

    /// The task's name as the CLI and configs spell it.
    pub fn name(self) -> &'static str {
        match self {
            Task::InvertedPendulum => "inverted-pendulum",
            Task::Hopper => "hopper",
            Task::Walker2d => "walker2d",
            Task::HalfCheetah => "half-cheetah",
            Task::Ant => "ant",
            Task::Humanoid => "humanoid",
            Task::Pendulum => "pendulum",
            Task::Linear => "linear",
        }
    }

    /// Observation size (for `Linear`: the default system's state size).
    pub fn obs_dim(self) -> usize {
        match self {
            Task::InvertedPendulum => 4,
            Task::Hopper => 11,
            Task::Walker2d => 17,
            Task::HalfCheetah => 17,
            Task::Ant => 27,
            Task::Humanoid => 45,
            Task::Pendulum => 2,
            Task::Linear => crate::analytic::LinearSystem::default().state_dim(),
        }
    }

    /// Action size (for `Linear`: the default system's input size).
    pub fn act_dim(self) -> usize {
        match self {
            Task::InvertedPendulum => 1,
            Task::Hopper => 3,
            Task::Walker2d => 6,
            Task::HalfCheetah => 6,
            Task::Ant => 8,
            Task::Humanoid => 17,
            Task::Pendulum => 1,
            Task::Linear => crate::analytic::LinearSystem::default().action_dim(),
        }
    }

    /// Whether the task runs on MuJoCo (and so needs the `mujoco` feature and the XMLs).
    pub fn is_mujoco(self) -> bool {
        !matches!(self, Task::Pendulum | Task::Linear)
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Task> {
        Task::from_name(s)
    }
}
