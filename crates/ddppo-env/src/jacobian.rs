//! True Jacobians of one env step in the learned models' coordinates,
//! `d(r, obs')/d(obs, a)`: the reference the models' derivatives are
//! measured against (the paper's Figure 2, on every env).
//!
//! One interface, [`StepJacobian`], for both kinds of env ([`make_jacobian`]):
//! - the analytic envs give their exact Jacobians
//!   ([`AnalyticDynamics::jacobian`]; their observation is the state);
//! - a MuJoCo task's Jacobian is taken by central finite differences in
//!   `f64` through the whole env step ([`crate::MujocoEnv::step_from`]): the state
//!   rebuilt from the observation ([`crate::MujocoModel::state_from_observation`],
//!   unobserved x / x-y positions at 0), the frame skip, the observation map
//!   (Hopper's and Walker2d's velocity clip included) and the v2 reward.
//!
//! The derivatives are with respect to the observation coordinates as the
//! models see them, raw (not standardised). Ant's and Humanoid's observations
//! hold the root quaternion; its four components are perturbed as they are,
//! off the unit sphere, and MuJoCo normalises the quaternion when it steps,
//! so the columns of those components hold the derivative of the normalised
//! motion (a perturbation along the quaternion itself changes nothing).
use crate::analytic::check_state;
use crate::error::{Error, Result};
use crate::task::Task;
use crate::{AnalyticDynamics, LinearEnv, Pendulum, check_action};

/// Central-difference step of the MuJoCo tasks' Jacobians, in raw units of
/// every observation and action coordinate. In `f64` the truncation error
/// (`h^2 |f'''| / 6`) and the rounding error (`1e-16 |f| / h`) are then both
/// about `1e-10` of the entries' scale on smooth (contact-free) states; where
/// a contact starts or ends within `h` the result is the secant slope.
pub const FD_STEP: f64 = 1e-6;

/// `d(r, obs')/d(obs, a)` of one env step at a given observation and action
/// (sizes: the task's [`Task::obs_dim`] and [`Task::act_dim`]).
pub trait StepJacobian: Send {
    /// Row-major `(1 + obs_dim) x (obs_dim + act_dim)`: row 0 is the reward's
    /// gradient, row `1 + i` that of `obs'_i`; columns are `obs` then `a`.
    /// An observation or action of the wrong length or with a non-finite
    /// value is an error.
    fn step_jacobian(&mut self, obs: &[f64], action: &[f64]) -> Result<Vec<f64>>;

    /// `(r, obs')` of the one env step whose Jacobian [`StepJacobian::step_jacobian`]
    /// gives: from the state `obs` stands for (MuJoCo: rebuilt from the
    /// observation), same checks.
    fn step_at(&mut self, obs: &[f64], action: &[f64]) -> Result<(f64, Vec<f64>)>;
}

/// The [`StepJacobian`] of `task` (`Linear` with the default system).
pub fn make_jacobian(task: Task) -> Result<Box<dyn StepJacobian>> {
    match task {
        Task::Pendulum => Ok(Box::new(Pendulum::new())),
        Task::Linear => Ok(Box::new(LinearEnv::default())),
        #[cfg(feature = "mujoco")]
        _ => Ok(Box::new(MujocoJacobian::new(&crate::MujocoModel::load(task)?))),
        #[cfg(not(feature = "mujoco"))]
        _ => Err(crate::Error::MujocoDisabled { task: task.name() }),
    }
}

/// One point of `ddppo env jacobian`'s input, a JSON list of
/// `{"obs": [...], "action": [...]}` (other keys are ignored).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct JacobianInput {
    pub obs: Vec<f64>,
    pub action: Vec<f64>,
}

impl JacobianInput {
    /// Parses the JSON list (floats are read exactly).
    pub fn list_from_json(text: &str) -> Result<Vec<Self>> {
        serde_json::from_str(text).map_err(|e| Error::JacobianInput(format!("bad jacobian input: {e}")))
    }

    /// The Jacobians of every point, in order; all points are checked before
    /// the first is computed, and a bad one is an error naming its index.
    pub fn jacobians(task: Task, points: &[Self]) -> Result<Vec<Vec<f64>>> {
        for (k, p) in points.iter().enumerate() {
            check_input(task.name(), &p.obs, task.obs_dim(), &p.action, task.act_dim())
                .map_err(|e| Error::JacobianInput(format!("item {k}: {e}")))?;
        }
        let mut jac = make_jacobian(task)?;
        points.iter().map(|p| jac.step_jacobian(&p.obs, &p.action)).collect()
    }
}

fn check_input(task: &'static str, obs: &[f64], obs_dim: usize, action: &[f64], act_dim: usize) -> Result<()> {
    check_state(task, "observation", obs, obs_dim)?;
    check_action(task, action, act_dim)
}

impl StepJacobian for Pendulum {
    fn step_jacobian(&mut self, obs: &[f64], action: &[f64]) -> Result<Vec<f64>> {
        check_input("pendulum", obs, 2, action, 1)?;
        Ok(self.jacobian(obs, action))
    }

    fn step_at(&mut self, obs: &[f64], action: &[f64]) -> Result<(f64, Vec<f64>)> {
        check_input("pendulum", obs, 2, action, 1)?;
        Ok(self.transition(obs, action))
    }
}

impl StepJacobian for LinearEnv {
    fn step_jacobian(&mut self, obs: &[f64], action: &[f64]) -> Result<Vec<f64>> {
        let (n, m) = (self.system().state_dim(), self.system().action_dim());
        check_input("linear", obs, n, action, m)?;
        Ok(self.jacobian(obs, action))
    }

    fn step_at(&mut self, obs: &[f64], action: &[f64]) -> Result<(f64, Vec<f64>)> {
        let (n, m) = (self.system().state_dim(), self.system().action_dim());
        check_input("linear", obs, n, action, m)?;
        Ok(self.transition(obs, action))
    }
}

/// Central differences `(f(x + h e_j) - f(x - h e_j)) / 2h` of `f: R^n -> R^k`,
/// row-major `k x n`.
fn central_differences(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> Result<Vec<f64>>) -> Result<Vec<f64>> {
    let n = x.len();
    let mut columns = Vec::with_capacity(n);
    let mut probe = x.to_vec();
    for j in 0..n {
        probe[j] = x[j] + h;
        let plus = f(&probe)?;
        probe[j] = x[j] - h;
        let minus = f(&probe)?;
        probe[j] = x[j];
        columns.push(plus.iter().zip(&minus).map(|(p, m)| (p - m) / (2.0 * h)).collect::<Vec<f64>>());
    }
    let k = columns.first().map_or(0, Vec::len);
    Ok((0..k).flat_map(|i| columns.iter().map(move |c| c[i])).collect())
}

/// A MuJoCo task's [`StepJacobian`], by central differences ([`FD_STEP`])
/// through [`crate::MujocoEnv::step_from`] on an env of its own: `2 (obs_dim +
/// act_dim)` env steps per Jacobian.
#[cfg(feature = "mujoco")]
pub struct MujocoJacobian {
    model: crate::MujocoModel,
    env: crate::MujocoEnv,
}

#[cfg(feature = "mujoco")]
impl MujocoJacobian {
    pub fn new(model: &crate::MujocoModel) -> Self {
        MujocoJacobian { model: model.clone(), env: model.make_env() }
    }

    /// `(r, obs')` of one env step from the state `obs` stands for.
    pub fn transition(&mut self, obs: &[f64], action: &[f64]) -> Result<(f64, Vec<f64>)> {
        let (qpos, qvel) = self.model.state_from_observation(obs)?;
        let step = self.env.step_from(&qpos, &qvel, action)?;
        Ok((step.reward, step.obs))
    }
}

#[cfg(feature = "mujoco")]
impl StepJacobian for MujocoJacobian {
    fn step_jacobian(&mut self, obs: &[f64], action: &[f64]) -> Result<Vec<f64>> {
        let task = self.model.task();
        let (d, m) = (task.obs_dim(), task.act_dim());
        check_input(task.name(), obs, d, action, m)?;
        let x = [obs, action].concat();
        central_differences(&x, FD_STEP, |x| {
            let (r, next) = self.transition(&x[..d], &x[d..])?;
            Ok(std::iter::once(r).chain(next).collect())
        })
    }

    fn step_at(&mut self, obs: &[f64], action: &[f64]) -> Result<(f64, Vec<f64>)> {
        let task = self.model.task();
        check_input(task.name(), obs, task.obs_dim(), action, task.act_dim())?;
        self.transition(obs, action)
    }
}
