//! Replaying recorded actions from a given state (the `ddppo env replay`
//! command and the gymnasium parity tests).
use crate::error::{Error, Result};
use crate::task::Task;
use crate::{Env, LinearEnv, Pendulum, StepResult};
use serde::Deserialize;

/// A start state and the actions to apply, as JSON:
/// `{"qpos": [...], "qvel": [...], "actions": [[...], ...]}` for the MuJoCo
/// tasks, `{"state": [...], "actions": [...]}` for the analytic ones.
/// Other keys are ignored, so a recorded fixture run is valid input.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ReplayInput {
    #[serde(default)]
    pub qpos: Option<Vec<f64>>,
    #[serde(default)]
    pub qvel: Option<Vec<f64>>,
    #[serde(default)]
    pub state: Option<Vec<f64>>,
    pub actions: Vec<Vec<f64>>,
}

impl ReplayInput {
    /// Parses the JSON form (floats are read exactly).
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Replay(format!("bad replay input: {e}")))
    }
}

/// Puts a fresh env of `task` in the input's start state and applies the
/// actions in order, calling `on_step` after each; stops after the first
/// step that terminates or truncates. Returns the number of steps taken.
pub fn replay(task: Task, input: &ReplayInput, mut on_step: impl FnMut(&StepResult)) -> Result<usize> {
    let mut env = start(task, input)?;
    let mut steps = 0;
    for (t, action) in input.actions.iter().enumerate() {
        let step = env.step(action).map_err(|e| Error::Replay(format!("action {t}: {e}")))?;
        steps += 1;
        on_step(&step);
        if step.terminated || step.truncated {
            break;
        }
    }
    Ok(steps)
}

fn start(task: Task, input: &ReplayInput) -> Result<Box<dyn Env>> {
    if task.is_mujoco() {
        if input.state.is_some() {
            return Err(Error::Replay(format!("{task} is a MuJoCo task: give `qpos` and `qvel`, not `state`")));
        }
        let (Some(qpos), Some(qvel)) = (&input.qpos, &input.qvel) else {
            return Err(Error::Replay(format!("{task} needs both `qpos` and `qvel`")));
        };
        #[cfg(feature = "mujoco")]
        {
            let mut env = crate::MujocoEnv::new(task)?;
            env.set_state(qpos, qvel)?;
            Ok(Box::new(env))
        }
        #[cfg(not(feature = "mujoco"))]
        {
            let _ = (qpos, qvel);
            Err(Error::MujocoDisabled { task: task.name() })
        }
    } else {
        if input.qpos.is_some() || input.qvel.is_some() {
            return Err(Error::Replay(format!("{task} is an analytic task: give `state`, not `qpos`/`qvel`")));
        }
        let Some(state) = &input.state else {
            return Err(Error::Replay(format!("{task} needs `state`")));
        };
        Ok(match task {
            Task::Pendulum => {
                let mut env = Pendulum::new();
                env.set_state(state)?;
                Box::new(env)
            }
            _ => {
                let mut env = LinearEnv::default();
                env.set_state(state)?;
                Box::new(env)
            }
        })
    }
}
