//! The six MuJoCo tasks with gym's v2 semantics on MuJoCo 3.17.0 (ALGORITHM.md
//! section 8).
//!
//! Each task follows the original gym v2 env (`hopper.py`, `ant.py`, ...)
//! on gymnasium's XMLs: the same frame skip, initial-state noise, reward,
//! termination and observation. The v2 specifics that differ from
//! gymnasium's v5 envs: the healthy bonus is paid on every step including
//! the terminating one, and there is no contact cost (MuJoCo 2.0, which v2
//! ran on, never filled `cfrc_ext`). Ant and Humanoid observations are
//! truncated to `qpos[2:] + qvel`, as in the paper.
use crate::analytic::check_state;
use crate::error::{Error, Result};
use crate::task::Task;
use crate::{Env, StepResult, check_action};
use mujoco_rs::prelude::{
    MjData, MjLogMessage, MjModel, MjtLogLevel, MjtObjBase, MjtState, MjtWarning, set_log_handler,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use std::path::PathBuf;
use std::sync::{Arc, Once};

/// Episode length of every MuJoCo task (gym's `TimeLimit`).
const MAX_EPISODE_STEPS: usize = 1000;

/// How gym perturbs the initial state on reset.
#[derive(Clone, Copy)]
enum ResetNoise {
    /// `qpos += U(-s, s)`, `qvel += U(-s, s)`.
    Uniform(f64),
    /// `qpos += U(-s, s)`, `qvel += s * N(0, 1)` (HalfCheetah, Ant).
    UniformNormal(f64),
}

/// What distinguishes one task from another.
struct Spec {
    xml: &'static str,
    frame_skip: usize,
    noise: ResetNoise,
}

fn spec(task: Task) -> Option<Spec> {
    let (xml, frame_skip, noise) = match task {
        Task::InvertedPendulum => ("inverted_pendulum.xml", 2, ResetNoise::Uniform(0.01)),
        Task::Hopper => ("hopper.xml", 4, ResetNoise::Uniform(5e-3)),
        Task::Walker2d => ("walker2d.xml", 4, ResetNoise::Uniform(5e-3)),
        Task::HalfCheetah => ("half_cheetah.xml", 5, ResetNoise::UniformNormal(0.1)),
        Task::Ant => ("ant.xml", 5, ResetNoise::UniformNormal(0.1)),
        Task::Humanoid => ("humanoid.xml", 5, ResetNoise::Uniform(0.01)),
        Task::Pendulum | Task::Linear => return None,
    };
    Some(Spec { xml, frame_skip, noise })
}

/// The directory holding gymnasium's model XMLs: `DDPPO_ASSETS_DIR` at run
/// time, else the value `.cargo/config.toml` gave it at build time.
pub fn assets_dir() -> Option<PathBuf> {
    std::env::var_os("DDPPO_ASSETS_DIR")
        .map(PathBuf::from)
        .or_else(|| option_env!("DDPPO_ASSETS_DIR").map(PathBuf::from))
}

/// MuJoCo's default handler prints warnings to stdout (where `ddppo env
/// replay` writes its JSON lines) and appends them to `MUJOCO_LOG.TXT` in
/// the working directory. Ours sends them to stderr and drops the one
/// warning every load of gymnasium's `half_cheetah.xml` raises (its
/// deprecated `settotalmass`, harmless here), and the instability warnings,
/// which [`MujocoEnv::step`] turns into [`Error::SimulationDiverged`].
fn mujoco_messages_to_stderr(message: &MjLogMessage) {
    let subject = message.subject();
    // Installing a handler turns on every info topic (e.g. compile times).
    let level = message.level();
    if level == MjtLogLevel::mjLOG_DEBUG
        || level == MjtLogLevel::mjLOG_INFO
        || subject.contains("'settotalmass' is deprecated")
        || subject.contains("The simulation is unstable")
    {
        return;
    }
    eprintln!("MuJoCo {:?}: {subject}", message.level());
}

static LOG_HANDLER: Once = Once::new();

/// One task's compiled model, shared (`Arc`) by all envs of that task.
///
/// ```no_run
/// use ddppo_env::{Env, MujocoModel, Task};
///
/// // Needs the XMLs (`cargo xtask setup`); each env gets its own MjData.
/// let model = MujocoModel::load(Task::Hopper)?;
/// let mut envs: Vec<_> = (0..4).map(|_| model.make_env()).collect();
/// for (seed, env) in envs.iter_mut().enumerate() {
///     env.reset(seed as u64);
///     let step = env.step(&[0.1, -0.2, 0.3])?;
///     println!("reward {} terminated {}", step.reward, step.terminated);
/// }
/// // Start from a given state, as gymnasium's set_state.
/// let (qpos, qvel) = envs[0].state();
/// envs[1].set_state(&qpos, &qvel)?;
/// # Ok::<(), ddppo_env::Error>(())
/// ```
#[derive(Clone)]
pub struct MujocoModel {
    task: Task,
    model: Arc<MjModel>,
    frame_skip: usize,
    noise: ResetNoise,
    /// Ant's torso body, whose `xpos` gives the forward progress.
    torso: usize,
    low: Vec<f64>,
    high: Vec<f64>,
}

impl MujocoModel {
    /// Loads the task's XML from [`assets_dir`].
    pub fn load(task: Task) -> Result<Self> {
        let spec = spec(task).ok_or(Error::NotMujoco { task: task.name() })?;
        let dir = assets_dir().ok_or_else(|| Error::AssetsMissing { path: PathBuf::from("$DDPPO_ASSETS_DIR") })?;
        if !dir.is_dir() {
            return Err(Error::AssetsMissing { path: dir });
        }
        // SAFETY: every use of MuJoCo in this crate starts with a model
        // loaded here, and `Once` makes concurrent callers wait until the
        // handler is in place, so no other thread is inside MuJoCo meanwhile.
        LOG_HANDLER.call_once(|| unsafe { set_log_handler(mujoco_messages_to_stderr) });
        let path = dir.join(spec.xml);
        if !path.is_file() {
            return Err(Error::AssetsMissing { path });
        }
        // MuJoCo's parser messages span lines; the error is one line.
        let model = MjModel::from_xml(&path).map_err(|e| Error::ModelLoad {
            path: path.clone(),
            msg: e.to_string().split_whitespace().collect::<Vec<_>>().join(" "),
        })?;
        let nu = model.ffi().nu as usize;
        if nu != task.act_dim() {
            return Err(Error::ModelLoad {
                path,
                msg: format!("has {nu} actuators, {task} expects {}", task.act_dim()),
            });
        }
        let torso = match task {
            Task::Ant => model
                .name_to_id(MjtObjBase::mjOBJ_BODY, "torso")
                .ok_or_else(|| Error::ModelLoad { path: path.clone(), msg: "has no body named `torso`".into() })?,
            _ => 0,
        };
        let (low, high) = model.actuator_ctrlrange().iter().map(|r| (r[0], r[1])).unzip();
        Ok(MujocoModel {
            task,
            model: Arc::new(model),
            frame_skip: spec.frame_skip,
            noise: spec.noise,
            torso,
            low,
            high,
        })
    }

    pub fn task(&self) -> Task {
        self.task
    }

    /// The compiled model.
    pub fn model(&self) -> &Arc<MjModel> {
        &self.model
    }

    /// Simulator steps per env step.
    pub fn frame_skip(&self) -> usize {
        self.frame_skip
    }

    /// Seconds per env step: `timestep * frame_skip`.
    pub fn dt(&self) -> f64 {
        self.model.opt().timestep * self.frame_skip as f64
    }

    /// The simulator state `(qpos, qvel)` an observation stands for: the
    /// observed coordinates copied back, the unobserved root position (x for
    /// Hopper, Walker2d and HalfCheetah; x and y for Ant and Humanoid) set to
    /// 0, which changes nothing but the position itself: the dynamics and
    /// the rewards (differences of x) are translation invariant. Hopper's and
    /// Walker2d's observed velocities are clipped to +-10, so a state with a
    /// faster joint comes back with that velocity at +-10.
    pub fn state_from_observation(&self, obs: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
        check_state(self.task.name(), "observation", obs, self.task.obs_dim())?;
        let (nq, nv) = (self.model.ffi().nq as usize, self.model.ffi().nv as usize);
        let hidden = match self.task {
            Task::InvertedPendulum => 0,
            Task::Hopper | Task::Walker2d | Task::HalfCheetah => 1,
            Task::Ant | Task::Humanoid => 2,
            Task::Pendulum | Task::Linear => unreachable!("MujocoModel::load rejects analytic tasks"),
        };
        if nq - hidden + nv != obs.len() {
            return Err(Error::ModelLoad {
                path: PathBuf::from(spec(self.task).map_or("", |s| s.xml)),
                msg: format!(
                    "has nq {nq}, nv {nv}, which do not make the {} observed values of {}",
                    obs.len(),
                    self.task
                ),
            });
        }
        let mut qpos = vec![0.0; hidden];
        qpos.extend_from_slice(&obs[..nq - hidden]);
        Ok((qpos, obs[nq - hidden..].to_vec()))
    }

    /// A new env with its own `MjData` on this model, in the model's default pose.
    pub fn make_env(&self) -> MujocoEnv {
        let data = MjData::new(self.model.clone());
        MujocoEnv { spec: self.clone(), data, steps: 0, dt: self.dt(), x_before: 0.0 }
    }
}

/// One env of a MuJoCo task: its own `MjData` on a shared [`MujocoModel`].
pub struct MujocoEnv {
    spec: MujocoModel,
    data: MjData<Arc<MjModel>>,
    steps: usize,
    dt: f64,
    /// The forward position the next step's reward starts from. It is a
    /// derived quantity (body frames of the last substep), kept here so that
    /// a saved state restores it exactly without re-running the kinematics.
    x_before: f64,
}

/// MuJoCo's checks of `mj_step` for values that are NaN, infinite or above
/// 1e10: on a bad `qpos`, `qvel` or `qacc` it resets the data to the model's
/// default pose and carries on, on a bad `ctrl` it zeroes the controls; either
/// way the step no longer follows the dynamics (gym v2's mujoco-py raised an
/// exception on these warnings).
const INSTABILITY_WARNINGS: [(MjtWarning, &str); 4] = [
    (MjtWarning::mjWARN_BADQPOS, "qpos"),
    (MjtWarning::mjWARN_BADQVEL, "qvel"),
    (MjtWarning::mjWARN_BADQACC, "qacc"),
    (MjtWarning::mjWARN_BADCTRL, "ctrl"),
];

/// What `mj_getState` saves: everything `mj_step` reads (time, qpos, qvel,
/// act, warm-start accelerations, ...).
const INTEGRATION_STATE: u32 = MjtState::mjSTATE_INTEGRATION as u32;

impl MujocoEnv {
    /// Loads the task's model and makes one env on it.
    pub fn new(task: Task) -> Result<Self> {
        Ok(MujocoModel::load(task)?.make_env())
    }

    pub fn task(&self) -> Task {
        self.spec.task
    }

    /// The model this env simulates (shared with the other envs of its [`MujocoModel`]).
    pub fn model(&self) -> &Arc<MjModel> {
        &self.spec.model
    }

    /// `(qpos, qvel)`.
    pub fn state(&self) -> (Vec<f64>, Vec<f64>) {
        (self.data.qpos().to_vec(), self.data.qvel().to_vec())
    }

    /// Sets `qpos` and `qvel` and recomputes the derived quantities
    /// (`mj_forward`), as gymnasium's `MujocoEnv.set_state`. Like gymnasium it
    /// resets neither time nor the step count.
    pub fn set_state(&mut self, qpos: &[f64], qvel: &[f64]) -> Result<()> {
        let task = self.spec.task.name();
        check_state(task, "qpos", qpos, self.data.qpos().len())?;
        check_state(task, "qvel", qvel, self.data.qvel().len())?;
        self.data.qpos_mut().copy_from_slice(qpos);
        self.data.qvel_mut().copy_from_slice(qvel);
        self.data.forward();
        self.x_before = self.forward_position();
        Ok(())
    }

    /// The observation of the current state (v2 definitions).
    pub fn observation(&self) -> Vec<f64> {
        let (qpos, qvel) = (self.data.qpos(), self.data.qvel());
        match self.spec.task {
            Task::InvertedPendulum => [qpos, qvel].concat(),
            // v2 clips the observed velocities (not the state) to +-10.
            Task::Hopper | Task::Walker2d => {
                qpos[1..].iter().copied().chain(qvel.iter().map(|v| v.clamp(-10.0, 10.0))).collect()
            }
            Task::HalfCheetah => [&qpos[1..], qvel].concat(),
            Task::Ant | Task::Humanoid => [&qpos[2..], qvel].concat(),
            Task::Pendulum | Task::Linear => unreachable!("MujocoModel::load rejects analytic tasks"),
        }
    }

    /// One env step from `(qpos, qvel)` on a freshly reset simulator
    /// (`mj_resetData`: time 0, no solver warm start left from earlier
    /// steps), so that the result depends on the state and the action alone.
    /// The step count restarts at 0.
    pub fn step_from(&mut self, qpos: &[f64], qvel: &[f64], action: &[f64]) -> Result<StepResult> {
        check_action(self.spec.task.name(), action, self.spec.task.act_dim())?;
        self.data.reset();
        self.steps = 0;
        self.set_state(qpos, qvel)?;
        self.step(action)
    }

    /// The number of steps since the last reset.
    pub fn elapsed_steps(&self) -> usize {
        self.steps
    }

    /// Raw simulator access, e.g. for benchmarks against bare `mj_step`.
    pub fn data(&self) -> &MjData<Arc<MjModel>> {
        &self.data
    }

    fn clear_instability_warnings(&mut self) {
        // SAFETY: plain integer fields of this env's own MjData; no MuJoCo
        // call runs on it meanwhile (`&mut self`).
        let warnings = unsafe { &mut self.data.ffi_mut().warning };
        for (w, _) in INSTABILITY_WARNINGS {
            warnings[w as usize].number = 0;
        }
    }

    /// The first instability warning MuJoCo raised since the counters were
    /// cleared: the quantity and the DOF or actuator index.
    fn instability(&self) -> Option<(&'static str, i32)> {
        let warnings = self.data.warning();
        INSTABILITY_WARNINGS
            .iter()
            .find(|(w, _)| warnings[*w as usize].number > 0)
            .map(|(w, name)| (*name, warnings[*w as usize].lastinfo))
    }

    /// Humanoid's forward position: the x of the mass-weighted body centres.
    fn mass_center_x(&self) -> f64 {
        let mass = self.spec.model.body_mass();
        let xipos = self.data.xipos();
        let total: f64 = mass.iter().sum();
        mass.iter().zip(xipos).map(|(m, x)| m * x[0]).sum::<f64>() / total
    }

    /// The x coordinate whose change is rewarded as forward progress.
    fn forward_position(&self) -> f64 {
        match self.spec.task {
            // gym's get_body_com("torso") is the body frame's xpos, which
            // after mj_step still holds the last substep's start (both v2
            // and v5 read it this way).
            Task::Ant => self.data.xpos()[self.spec.torso][0],
            Task::Humanoid => self.mass_center_x(),
            _ => self.data.qpos()[0],
        }
    }
}

impl Env for MujocoEnv {
    fn obs_dim(&self) -> usize {
        self.spec.task.obs_dim()
    }
    fn act_dim(&self) -> usize {
        self.spec.task.act_dim()
    }
    fn action_low(&self) -> &[f64] {
        &self.spec.low
    }
    fn action_high(&self) -> &[f64] {
        &self.spec.high
    }
    fn max_episode_steps(&self) -> usize {
        MAX_EPISODE_STEPS
    }

    /// `mj_resetData`, then the default pose plus gym's noise for this task.
    fn reset(&mut self, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        self.data.reset();
        let (qpos0, nv) = (self.spec.model.qpos0().to_vec(), self.data.qvel().len());
        let (ResetNoise::Uniform(s) | ResetNoise::UniformNormal(s)) = self.spec.noise;
        let qpos: Vec<f64> = qpos0.iter().map(|q| q + rng.random_range(-s..s)).collect();
        let qvel: Vec<f64> = (0..nv)
            .map(|_| match self.spec.noise {
                ResetNoise::Uniform(s) => rng.random_range(-s..s),
                ResetNoise::UniformNormal(s) => s * rng.sample::<f64, _>(StandardNormal),
            })
            .collect();
        self.data.qpos_mut().copy_from_slice(&qpos);
        self.data.qvel_mut().copy_from_slice(&qvel);
        self.data.forward();
        self.steps = 0;
        self.x_before = self.forward_position();
        self.observation()
    }

    fn step(&mut self, action: &[f64]) -> Result<StepResult> {
        let task = self.spec.task;
        check_action(task.name(), action, task.act_dim())?;
        let x_before = self.x_before;
        // gym sets ctrl to the raw action; MuJoCo clamps to ctrlrange itself.
        self.data.ctrl_mut().copy_from_slice(action);
        // The counters are diagnostics only (no part of the dynamics or of
        // the saved state). `mj_resetData` clears them before counting the
        // warning that caused it, so only counters that start at zero show
        // every divergence.
        self.clear_instability_warnings();
        for _ in 0..self.spec.frame_skip {
            self.data.step();
            if let Some((quantity, index)) = self.instability() {
                return Err(Error::SimulationDiverged { task: task.name(), step: self.steps + 1, quantity, index });
            }
        }
        self.steps += 1;
        self.x_before = self.forward_position();
        let x_velocity = (self.x_before - x_before) / self.dt;
        let ctrl_sq: f64 = action.iter().map(|a| a * a).sum();
        let (qpos, qvel) = (self.data.qpos(), self.data.qvel());
        let finite = || qpos.iter().chain(qvel).all(|x| x.is_finite());
        // Rewards and terminations of gym's v2 envs; the healthy bonus is
        // paid whether or not this step terminates.
        let (reward, terminated) = match task {
            Task::InvertedPendulum => (1.0, !(finite() && qpos[1].abs() <= 0.2)),
            Task::Hopper => {
                let (height, angle) = (qpos[1], qpos[2]);
                let healthy = finite()
                    && qpos[2..].iter().chain(qvel).all(|x| x.abs() < 100.0)
                    && height > 0.7
                    && angle.abs() < 0.2;
                (x_velocity + 1.0 - 1e-3 * ctrl_sq, !healthy)
            }
            Task::Walker2d => {
                let (height, angle) = (qpos[1], qpos[2]);
                let healthy = height > 0.8 && height < 2.0 && angle > -1.0 && angle < 1.0;
                (x_velocity + 1.0 - 1e-3 * ctrl_sq, !healthy)
            }
            Task::HalfCheetah => (x_velocity - 0.1 * ctrl_sq, false),
            Task::Ant => {
                let healthy = finite() && qpos[2] >= 0.2 && qpos[2] <= 1.0;
                (x_velocity - 0.5 * ctrl_sq + 1.0, !healthy)
            }
            Task::Humanoid => {
                let healthy = qpos[2] >= 1.0 && qpos[2] <= 2.0;
                (1.25 * x_velocity - 0.1 * ctrl_sq + 5.0, !healthy)
            }
            Task::Pendulum | Task::Linear => unreachable!("MujocoModel::load rejects analytic tasks"),
        };
        Ok(StepResult { obs: self.observation(), reward, terminated, truncated: self.steps >= MAX_EPISODE_STEPS })
    }

    /// `[steps, x_before, mj_getState(mjSTATE_INTEGRATION)...]`.
    fn save_state(&self) -> Vec<f64> {
        let mut out = vec![self.steps as f64, self.x_before];
        out.extend_from_slice(&self.data.state(INTEGRATION_STATE));
        out
    }

    fn restore_state(&mut self, state: &[f64]) -> Result<()> {
        let task = self.spec.task.name();
        let expected = 2 + self.spec.model.state_size(INTEGRATION_STATE);
        let steps = crate::saved_steps(task, state, expected)?;
        self.data
            .set_state(&state[2..], INTEGRATION_STATE)
            .map_err(|e| Error::SavedState { task, msg: e.to_string() })?;
        self.steps = steps;
        self.x_before = state[1];
        Ok(())
    }
}
