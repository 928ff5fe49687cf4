//! Evaluation episodes on worker threads.
//!
//! Episode `i` starts from `reset(base_seed + i)` and runs the policy until
//! termination or truncation, so every return depends only on its index and
//! the result is the same for any number of workers.
use crate::error::{Error, Result};
use crate::task::Task;
use crate::{Env, LinearEnv, LinearSystem, Pendulum};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Makes envs of one task; for a MuJoCo task all of them share one model.
#[derive(Clone)]
pub enum EnvFactory {
    #[cfg(feature = "mujoco")]
    Mujoco(crate::MujocoModel),
    Pendulum,
    Linear(LinearSystem),
}

impl EnvFactory {
    /// Loads what `task` needs once (a MuJoCo model, or the default linear system).
    pub fn new(task: Task) -> Result<Self> {
        match task {
            Task::Pendulum => Ok(EnvFactory::Pendulum),
            Task::Linear => Ok(EnvFactory::Linear(LinearSystem::default())),
            #[cfg(feature = "mujoco")]
            _ => Ok(EnvFactory::Mujoco(crate::MujocoModel::load(task)?)),
            #[cfg(not(feature = "mujoco"))]
            _ => Err(Error::MujocoDisabled { task: task.name() }),
        }
    }

    /// A fresh env.
    pub fn make(&self) -> Result<Box<dyn Env>> {
        Ok(match self {
            #[cfg(feature = "mujoco")]
            EnvFactory::Mujoco(model) => Box::new(model.make_env()),
            EnvFactory::Pendulum => Box::new(Pendulum::new()),
            EnvFactory::Linear(sys) => Box::new(LinearEnv::new(sys.clone())?),
        })
    }
}

/// One finished evaluation episode.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpisodeStats {
    /// Sum of rewards.
    pub ret: f64,
    /// Steps taken.
    pub len: usize,
    /// The simulation diverged ([`Error::SimulationDiverged`]): the episode
    /// was cut there, as a truncation, its return summed up to that step.
    pub diverged: bool,
    /// Sum over the steps taken of the mean absolute action component
    /// `mean_i |a_i|` (the policy's actions as given, before the env clips them).
    pub action_abs: f64,
}

/// Returns of `episodes` episodes of `task` under a deterministic `policy`
/// (observation -> action), run on `workers` threads; see [`evaluate_episodes`].
pub fn evaluate(
    task: Task,
    policy: &(dyn Fn(&[f64]) -> Vec<f64> + Sync),
    episodes: usize,
    base_seed: u64,
    workers: usize,
) -> Result<Vec<f64>> {
    let factory = EnvFactory::new(task)?;
    Ok(evaluate_episodes(&factory, policy, episodes, base_seed, workers)?.into_iter().map(|e| e.ret).collect())
}

/// Runs `episodes` episodes, episode `i` from seed `base_seed + i`, on
/// `workers` crossbeam threads (each with its own env), and returns them in
/// episode order. The first error (e.g. a policy action of the wrong
/// length) stops the evaluation; a diverged simulation only ends its episode
/// ([`EpisodeStats::diverged`]).
pub fn evaluate_episodes(
    factory: &EnvFactory,
    policy: &(dyn Fn(&[f64]) -> Vec<f64> + Sync),
    episodes: usize,
    base_seed: u64,
    workers: usize,
) -> Result<Vec<EpisodeStats>> {
    if workers == 0 {
        return Err(Error::Evaluation("needs at least one worker".into()));
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<EpisodeStats>>> = Mutex::new(vec![None; episodes]);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let worker = || -> Result<()> {
        let mut env = factory.make()?;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= episodes || first_error.lock().map_or(true, |e| e.is_some()) {
                return Ok(());
            }
            let stats = run_episode(env.as_mut(), policy, base_seed.wrapping_add(i as u64))?;
            if let Ok(mut r) = results.lock() {
                r[i] = Some(stats);
            }
        }
    };
    crossbeam::scope(|scope| {
        for _ in 0..workers.min(episodes.max(1)) {
            scope.spawn(|_| {
                if let (Err(e), Ok(mut slot)) = (worker(), first_error.lock()) {
                    slot.get_or_insert(e);
                }
            });
        }
    })
    .map_err(|_| Error::Evaluation("a worker thread panicked".into()))?;
    if let Some(e) = first_error.into_inner().map_err(|_| Error::Evaluation("lock poisoned".into()))? {
        return Err(e);
    }
    let results = results.into_inner().map_err(|_| Error::Evaluation("lock poisoned".into()))?;
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.ok_or_else(|| Error::Evaluation(format!("episode {i} did not run"))))
        .collect()
}

fn run_episode(env: &mut dyn Env, policy: &(dyn Fn(&[f64]) -> Vec<f64> + Sync), seed: u64) -> Result<EpisodeStats> {
    let mut obs = env.reset(seed);
    let mut stats = EpisodeStats { ret: 0.0, len: 0, diverged: false, action_abs: 0.0 };
    loop {
        let action = policy(&obs);
        let abs_mean = action.iter().map(|a| a.abs()).sum::<f64>() / action.len().max(1) as f64;
        let step = match env.step(&action) {
            Ok(step) => step,
            Err(Error::SimulationDiverged { .. }) => {
                stats.diverged = true;
                return Ok(stats);
            }
            Err(e) => return Err(e),
        };
        stats.ret += step.reward;
        stats.len += 1;
        stats.action_abs += abs_mean;
        if step.terminated || step.truncated {
            return Ok(stats);
        }
        obs = step.obs;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StepResult;

    /// Diverges at its third step; rewards 1 per step before that.
    struct Diverging {
        steps: usize,
    }

    impl Env for Diverging {
        fn obs_dim(&self) -> usize {
            1
        }
        fn act_dim(&self) -> usize {
            1
        }
        fn action_low(&self) -> &[f64] {
            &[-1.0]
        }
        fn action_high(&self) -> &[f64] {
            &[1.0]
        }
        fn max_episode_steps(&self) -> usize {
            10
        }
        fn reset(&mut self, _seed: u64) -> Vec<f64> {
            self.steps = 0;
            vec![0.0]
        }
        fn step(&mut self, _action: &[f64]) -> Result<StepResult> {
            self.steps += 1;
            if self.steps == 3 {
                return Err(Error::SimulationDiverged { task: "test", step: 3, quantity: "qacc", index: 0 });
            }
            Ok(StepResult { obs: vec![0.0], reward: 1.0, terminated: false, truncated: self.steps >= 10 })
        }
        fn save_state(&self) -> Vec<f64> {
            vec![self.steps as f64]
        }
        fn restore_state(&mut self, _state: &[f64]) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_diverged_episode_ends_there_and_other_errors_stop() {
        let mut env = Diverging { steps: 0 };
        let stats = run_episode(&mut env, &|_| vec![-0.25], 0).unwrap();
        // |a| summed over the two steps taken, not over the diverging third.
        assert_eq!(stats, EpisodeStats { ret: 2.0, len: 2, diverged: true, action_abs: 0.5 });
        // An action of the wrong length is still an error.
        let mut pendulum = Pendulum::new();
        assert!(run_episode(&mut pendulum, &|_| vec![0.0, 0.0], 0).is_err());
        let stats = run_episode(&mut pendulum, &|_| vec![0.0], 0).unwrap();
        assert_eq!((stats.len, stats.diverged), (200, false));
    }
}
