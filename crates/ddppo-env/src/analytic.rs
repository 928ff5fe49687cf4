//! Envs with closed-form dynamics and exact Jacobians, for the gradient-error
//! study (paper section 5.1, Figure 2; ALGORITHM.md section 8).
use crate::error::{Error, Result};
use crate::{Env, StepResult, check_action};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;
use std::path::Path;

/// Closed-form dynamics `(r, s') = f(s, a)` and its Jacobian.
pub trait AnalyticDynamics {
    /// `(r, s')` for state `s` and action `a` (actions are clipped to the bounds first).
    fn transition(&self, s: &[f64], a: &[f64]) -> (f64, Vec<f64>);
    /// `d(r, s')/d(s, a)`, row-major `(1 + obs_dim) x (obs_dim + act_dim)`:
    /// row 0 is the reward's gradient, row `1 + i` that of `s'_i`; columns are
    /// `s` then `a`. Where an action component is clipped its column is 0.
    fn jacobian(&self, s: &[f64], a: &[f64]) -> Vec<f64>;
}

/// `x` wrapped into `[-pi, pi)`, gym's `angle_normalize`.
fn angle_normalize(x: f64) -> f64 {
    (x + PI).rem_euclid(2.0 * PI) - PI
}

/// gym's Pendulum dynamics on the raw state `(theta, theta_dot)` (the
/// observation is the state, not gym's `(cos, sin, theta_dot)`).
///
/// `theta_dot' = clip(theta_dot + (3g/(2l) sin theta + 3/(m l^2) u) dt, +-8)`,
/// `theta' = wrap(theta + theta_dot' dt)`, `u = clip(a, +-2)`, and the reward
/// on the pre-step state `-(wrap(theta)^2 + 0.1 theta_dot^2 + 0.001 u^2)`.
/// `theta'` is wrapped into `[-pi, pi)` so a policy sees bounded input; the
/// Jacobian ignores the wrap (it holds almost everywhere).
#[derive(Clone, Debug)]
pub struct Pendulum {
    state: [f64; 2],
    steps: usize,
}

impl Pendulum {
    pub const G: f64 = 10.0;
    pub const M: f64 = 1.0;
    pub const L: f64 = 1.0;
    pub const DT: f64 = 0.05;
    pub const MAX_TORQUE: f64 = 2.0;
    pub const MAX_SPEED: f64 = 8.0;
    pub const MAX_EPISODE_STEPS: usize = 200;
    const LOW: [f64; 1] = [-Self::MAX_TORQUE];
    const HIGH: [f64; 1] = [Self::MAX_TORQUE];

    /// A pendulum hanging at rest; call [`Env::reset`] for a random start.
    pub fn new() -> Self {
        Pendulum { state: [0.0, 0.0], steps: 0 }
    }

    /// The current state `(theta, theta_dot)`.
    pub fn state(&self) -> Vec<f64> {
        self.state.to_vec()
    }

    /// Puts the pendulum in state `(theta, theta_dot)`; the step count is kept.
    pub fn set_state(&mut self, state: &[f64]) -> Result<()> {
        check_state("pendulum", "state", state, 2)?;
        self.state = [state[0], state[1]];
        Ok(())
    }
}

impl Default for Pendulum {
    fn default() -> Self {
        Self::new()
    }
}

impl AnalyticDynamics for Pendulum {
    fn transition(&self, s: &[f64], a: &[f64]) -> (f64, Vec<f64>) {
        let (th, thd) = (s[0], s[1]);
        let u = a[0].clamp(-Self::MAX_TORQUE, Self::MAX_TORQUE);
        let reward = -(angle_normalize(th).powi(2) + 0.1 * thd * thd + 0.001 * u * u);
        let acc = 3.0 * Self::G / (2.0 * Self::L) * th.sin() + 3.0 / (Self::M * Self::L * Self::L) * u;
        let new_thd = (thd + acc * Self::DT).clamp(-Self::MAX_SPEED, Self::MAX_SPEED);
        let new_th = angle_normalize(th + new_thd * Self::DT);
        (reward, vec![new_th, new_thd])
    }

    fn jacobian(&self, s: &[f64], a: &[f64]) -> Vec<f64> {
        let (th, thd) = (s[0], s[1]);
        let dt = Self::DT;
        let u_free = a[0].abs() < Self::MAX_TORQUE;
        let u = a[0].clamp(-Self::MAX_TORQUE, Self::MAX_TORQUE);
        let du = if u_free { 1.0 } else { 0.0 };
        let raw_thd = thd + (3.0 * Self::G / (2.0 * Self::L) * th.sin() + 3.0 / (Self::M * Self::L * Self::L) * u) * dt;
        let speed_free = if raw_thd.abs() < Self::MAX_SPEED { 1.0 } else { 0.0 };
        // d theta_dot' / d (theta, theta_dot, a)
        let dthd = [
            speed_free * 3.0 * Self::G / (2.0 * Self::L) * th.cos() * dt,
            speed_free,
            speed_free * 3.0 / (Self::M * Self::L * Self::L) * dt * du,
        ];
        // theta' = theta + theta_dot' dt
        let dth = [1.0 + dthd[0] * dt, dthd[1] * dt, dthd[2] * dt];
        let dr = [-2.0 * angle_normalize(th), -0.2 * thd, -0.002 * u * du];
        [dr, dth, dthd].concat()
    }
}

impl Env for Pendulum {
    fn obs_dim(&self) -> usize {
        2
    }
    fn act_dim(&self) -> usize {
        1
    }
    fn action_low(&self) -> &[f64] {
        &Self::LOW
    }
    fn action_high(&self) -> &[f64] {
        &Self::HIGH
    }
    fn max_episode_steps(&self) -> usize {
        Self::MAX_EPISODE_STEPS
    }
    fn reset(&mut self, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        self.state = [rng.random_range(-PI..PI), rng.random_range(-1.0..1.0)];
        self.steps = 0;
        self.state.to_vec()
    }
    fn step(&mut self, action: &[f64]) -> Result<StepResult> {
        check_action("pendulum", action, 1)?;
        let (reward, next) = self.transition(&self.state, action);
        self.state = [next[0], next[1]];
        self.steps += 1;
        Ok(StepResult { obs: next, reward, terminated: false, truncated: self.steps >= Self::MAX_EPISODE_STEPS })
    }
    /// `[steps, theta, theta_dot]`.
    fn save_state(&self) -> Vec<f64> {
        vec![self.steps as f64, self.state[0], self.state[1]]
    }
    fn restore_state(&mut self, state: &[f64]) -> Result<()> {
        let steps = crate::saved_steps("pendulum", state, 3)?;
        self.state = [state[1], state[2]];
        self.steps = steps;
        Ok(())
    }
}

/// The matrices of a linear system `s' = A s + B a` with reward
/// `r = -(s^T Q s + a^T R a)` on the pre-step state (as Pendulum's reward).
///
/// Read from TOML (`configs/linear.toml` holds the default): keys `a` (n x n),
/// `b` (n x m), `q` (n x n), `r` (m x m), each a list of rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearSystem {
    pub a: Vec<Vec<f64>>,
    pub b: Vec<Vec<f64>>,
    pub q: Vec<Vec<f64>>,
    pub r: Vec<Vec<f64>>,
}

impl Default for LinearSystem {
    /// A stable 3-state, 2-input chain: `A` upper bidiagonal with 0.9 on the
    /// diagonal (spectral radius 0.9), each input drives one of the last two
    /// states, `Q = I`, `R = 0.1 I`. Same as `configs/linear.toml`.
    fn default() -> Self {
        LinearSystem {
            a: vec![vec![0.9, 0.1, 0.0], vec![0.0, 0.9, 0.1], vec![0.0, 0.0, 0.9]],
            b: vec![vec![0.0, 0.0], vec![0.1, 0.0], vec![0.0, 0.1]],
            q: vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0], vec![0.0, 0.0, 1.0]],
            r: vec![vec![0.1, 0.0], vec![0.0, 0.1]],
        }
    }
}

impl LinearSystem {
    /// Parses and validates a system from TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let sys: LinearSystem = toml::from_str(text).map_err(|e| Error::LinearSystem(e.message().to_string()))?;
        sys.validate()?;
        Ok(sys)
    }

    /// Reads and validates a system from a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Self::from_toml_str(&text).map_err(|e| match e {
            Error::LinearSystem(msg) => Error::LinearSystem(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// `n`, the state size.
    pub fn state_dim(&self) -> usize {
        self.a.len()
    }

    /// `m`, the action size.
    pub fn action_dim(&self) -> usize {
        self.b.first().map_or(0, Vec::len)
    }

    /// Checks the shapes (`A` n x n, `B` n x m, `Q` n x n, `R` m x m, n, m >= 1) and finiteness.
    pub fn validate(&self) -> Result<()> {
        let n = self.state_dim();
        let m = self.action_dim();
        if n == 0 || m == 0 {
            return Err(Error::LinearSystem(format!("needs at least one state and one action (got n = {n}, m = {m})")));
        }
        for (name, mat, rows, cols) in
            [("a", &self.a, n, n), ("b", &self.b, n, m), ("q", &self.q, n, n), ("r", &self.r, m, m)]
        {
            if mat.len() != rows || mat.iter().any(|row| row.len() != cols) {
                let got: Vec<usize> = mat.iter().map(Vec::len).collect();
                return Err(Error::LinearSystem(format!(
                    "`{name}` must be {rows} x {cols} (n = {n} states, m = {m} actions), got {} rows of lengths {got:?}",
                    mat.len()
                )));
            }
            if let Some(x) = mat.iter().flatten().find(|x| !x.is_finite()) {
                return Err(Error::LinearSystem(format!("`{name}` holds a non-finite entry {x}")));
            }
        }
        Ok(())
    }
}

fn mat_vec(m: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    m.iter().map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

fn quad_form(m: &[Vec<f64>], x: &[f64]) -> f64 {
    mat_vec(m, x).iter().zip(x).map(|(a, b)| a * b).sum()
}

/// The linear env: `s' = A s + B clip(a)`, `r = -(s^T Q s + a^T R a)`,
/// actions bounded to `[-1, 1]`, 200-step episodes, reset `s ~ U(-1, 1)^n`.
#[derive(Clone, Debug)]
pub struct LinearEnv {
    sys: LinearSystem,
    state: Vec<f64>,
    steps: usize,
    low: Vec<f64>,
    high: Vec<f64>,
}

impl LinearEnv {
    pub const MAX_EPISODE_STEPS: usize = 200;
    pub const ACTION_BOUND: f64 = 1.0;

    /// An env on a validated system, starting at `s = 0`.
    pub fn new(sys: LinearSystem) -> Result<Self> {
        sys.validate()?;
        let (n, m) = (sys.state_dim(), sys.action_dim());
        Ok(LinearEnv {
            sys,
            state: vec![0.0; n],
            steps: 0,
            low: vec![-Self::ACTION_BOUND; m],
            high: vec![Self::ACTION_BOUND; m],
        })
    }

    /// The system's matrices.
    pub fn system(&self) -> &LinearSystem {
        &self.sys
    }

    /// The current state.
    pub fn state(&self) -> Vec<f64> {
        self.state.clone()
    }

    /// Puts the system in `state`; the step count is kept.
    pub fn set_state(&mut self, state: &[f64]) -> Result<()> {
        check_state("linear", "state", state, self.sys.state_dim())?;
        self.state.copy_from_slice(state);
        Ok(())
    }

    fn clip(&self, a: &[f64]) -> Vec<f64> {
        a.iter().map(|x| x.clamp(-Self::ACTION_BOUND, Self::ACTION_BOUND)).collect()
    }
}

impl Default for LinearEnv {
    fn default() -> Self {
        Self::new(LinearSystem::default()).expect("the default linear system is valid")
    }
}

impl AnalyticDynamics for LinearEnv {
    fn transition(&self, s: &[f64], a: &[f64]) -> (f64, Vec<f64>) {
        let a = self.clip(a);
        let reward = -(quad_form(&self.sys.q, s) + quad_form(&self.sys.r, &a));
        let next = mat_vec(&self.sys.a, s).iter().zip(mat_vec(&self.sys.b, &a)).map(|(x, y)| x + y).collect();
        (reward, next)
    }

    fn jacobian(&self, s: &[f64], a: &[f64]) -> Vec<f64> {
        let (n, m) = (self.sys.state_dim(), self.sys.action_dim());
        let ac = self.clip(a);
        let free: Vec<f64> = a.iter().map(|x| if x.abs() < Self::ACTION_BOUND { 1.0 } else { 0.0 }).collect();
        let cols = n + m;
        let mut jac = vec![0.0; (1 + n) * cols];
        // dr/ds = -(Q + Q^T) s, dr/da = -(R + R^T) a (masked where clipped).
        for (j, out) in jac[..n].iter_mut().enumerate() {
            *out = -(0..n).map(|i| (self.sys.q[j][i] + self.sys.q[i][j]) * s[i]).sum::<f64>();
        }
        for (j, out) in jac[n..n + m].iter_mut().enumerate() {
            *out = -free[j] * (0..m).map(|i| (self.sys.r[j][i] + self.sys.r[i][j]) * ac[i]).sum::<f64>();
        }
        // ds'/ds = A, ds'/da = B (masked).
        for i in 0..n {
            let row = &mut jac[(1 + i) * cols..(2 + i) * cols];
            row[..n].copy_from_slice(&self.sys.a[i]);
            for j in 0..m {
                row[n + j] = self.sys.b[i][j] * free[j];
            }
        }
        jac
    }
}

impl Env for LinearEnv {
    fn obs_dim(&self) -> usize {
        self.sys.state_dim()
    }
    fn act_dim(&self) -> usize {
        self.sys.action_dim()
    }
    fn action_low(&self) -> &[f64] {
        &self.low
    }
    fn action_high(&self) -> &[f64] {
        &self.high
    }
    fn max_episode_steps(&self) -> usize {
        Self::MAX_EPISODE_STEPS
    }
    fn reset(&mut self, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for x in &mut self.state {
            *x = rng.random_range(-1.0..1.0);
        }
        self.steps = 0;
        self.state.clone()
    }
    fn step(&mut self, action: &[f64]) -> Result<StepResult> {
        check_action("linear", action, self.sys.action_dim())?;
        let (reward, next) = self.transition(&self.state, action);
        self.state.copy_from_slice(&next);
        self.steps += 1;
        Ok(StepResult { obs: next, reward, terminated: false, truncated: self.steps >= Self::MAX_EPISODE_STEPS })
    }
    /// `[steps, s...]`.
    fn save_state(&self) -> Vec<f64> {
        std::iter::once(self.steps as f64).chain(self.state.iter().copied()).collect()
    }
    fn restore_state(&mut self, state: &[f64]) -> Result<()> {
        let steps = crate::saved_steps("linear", state, 1 + self.state.len())?;
        self.state.copy_from_slice(&state[1..]);
        self.steps = steps;
        Ok(())
    }
}

/// Length and finiteness of a user-given state vector.
pub(crate) fn check_state(task: &'static str, what: &'static str, x: &[f64], expected: usize) -> Result<()> {
    if x.len() != expected {
        return Err(Error::StateLength { task, what, expected, got: x.len() });
    }
    if let Some((index, &value)) = x.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFiniteState { what, index, value });
    }
    Ok(())
}
