//! Hooks for `ddppo profile` (issue 12): record a run's first transitions,
//! put a fresh agent in the state of a run after `N` env steps, and read back
//! how long its last model training took per ensemble.
//!
//! The profile times the agent's own calls (`train_models`, `rollout_models`,
//! `update_critic`, the policy update, `evaluate`); this module only sets the
//! stage for them, so what is timed is what a run executes.

use ddppo_buffer::ReplayBuffer;
use ddppo_models::TransitionData;
use ddppo_models::gemm_bound::{self, EpochBound};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::agent::ensemble_specs;

use crate::{Agent, AgentConfig, Error, Result};

/// Epochs and wall seconds of one ensemble's part of a model training.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EnsembleTraining {
    /// Epochs run (early stopping or the `model.max_epochs` cap ended it).
    pub epochs: usize,
    /// Wall seconds of the ensemble's training call, its set-up (split,
    /// scaler, the gradient ensemble's neighbour search) included.
    pub seconds: f64,
    /// Mean holdout MSE of `(r, ds)` of its elites (the restored weights').
    pub holdout_mse: f64,
}

/// The last [`Agent::train_models`]: the rollout (prediction) ensemble and,
/// for `ddppo`, the separate gradient ensemble (trained at the same time on
/// a second thread).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelTraining {
    /// The ensemble that rolls out.
    pub prediction: EnsembleTraining,
    /// The separate gradient ensemble, when the variant has one.
    pub gradient: Option<EnsembleTraining>,
}

/// The last model training of this agent (`None` before the first, and
/// after a resume until the next: it is not part of a checkpoint).
pub fn last_model_training(agent: &Agent) -> Option<ModelTraining> {
    agent.last_training
}

/// The first `rows` transitions of the run `cfg` describes, all with the
/// warm-up's uniform random actions: the run's own env and action streams,
/// so up to `start_steps` rows they are exactly the run's (beyond it a run
/// would act with its policy, which only a run can train). `on_rows` is
/// called every 10,000 rows.
pub fn record_transitions(cfg: &AgentConfig, rows: usize, on_rows: &mut dyn FnMut(usize)) -> Result<ReplayBuffer> {
    if rows == 0 || rows >= cfg.replay_size {
        return Err(Error::Config(format!("cannot record {rows} rows: need 1..{} (replay_size)", cfg.replay_size)));
    }
    let mut rec = cfg.clone();
    // Random actions throughout; no training, update or evaluation is ever
    // due, so the agent's steps are pure data collection.
    rec.start_steps = rows;
    rec.min_pool_size = rec.replay_size;
    rec.eval_every = 1_000_000_000;
    let mut agent = Agent::new(rec)?;
    while agent.env_steps() < rows {
        agent.step()?;
        let _ = agent.take_warning();
        if agent.env_steps().is_multiple_of(10_000) {
            on_rows(agent.env_steps());
        }
    }
    let cols = agent.env_buffer.newest(rows);
    let (od, ad) = (agent.env_buffer.obs_dim(), agent.env_buffer.act_dim());
    let mut out = ReplayBuffer::new(od, ad, rows);
    out.push_batch(&cols.obs, &cols.act, &cols.rew, &cols.next_obs, &cols.mask, &cols.done)?;
    Ok(out)
}

/// Fills a fresh agent's `D_env` with the first `rows` rows of `data` and
/// sets its env-step counter to `rows`, as after `rows` env steps of a run:
/// the rollout length `k` and `D_model`'s size follow the schedule there.
pub fn load_transitions(agent: &mut Agent, data: &ReplayBuffer, rows: usize) -> Result<()> {
    if agent.run.env_steps != 0 || !agent.env_buffer.is_empty() {
        return Err(Error::Config("transitions go into a fresh agent only".into()));
    }
    if (data.obs_dim(), data.act_dim()) != (agent.env_buffer.obs_dim(), agent.env_buffer.act_dim()) {
        return Err(Error::Shape(format!(
            "recorded transitions have obs {} / act {}, the task has {} / {}",
            data.obs_dim(),
            data.act_dim(),
            agent.env_buffer.obs_dim(),
            agent.env_buffer.act_dim()
        )));
    }
    if rows > data.len() || rows > agent.env_buffer.capacity() {
        return Err(Error::Config(format!(
            "{rows} rows asked, {} recorded, D_env holds {}",
            data.len(),
            agent.env_buffer.capacity()
        )));
    }
    // `newest` counts from the end: the oldest `rows` are the first of the run.
    let all = data.newest(data.len());
    let (od, ad) = (data.obs_dim(), data.act_dim());
    agent.env_buffer.push_batch(
        &all.obs[..rows * od],
        &all.act[..rows * ad],
        &all.rew[..rows],
        &all.next_obs[..rows * od],
        &all.mask[..rows],
        &all.done[..rows],
    )?;
    agent.run.env_steps = rows;
    Ok(())
}

/// Critic updates per env step once a run is past `min_pool_size`: `G2`,
/// unless `max_train_repeat_per_step` caps it lower (the cap grows by that
/// much per step, so in the long run it binds only below `G2`).
pub fn critic_updates_per_step(cfg: &AgentConfig) -> usize {
    cfg.critic_updates_per_step.min(cfg.max_train_repeat_per_step)
}

/// Each of the run's ensembles (`"prediction"`, and `"gradient"` when the
/// variant has a separate one) trained fresh for `epochs` epochs on the
/// first `rows` rows of `data`, one epoch timed against the GEMM bound of
/// its products ([`ddppo_models::gemm_bound`]). Their weights and shuffles
/// come from stream 7 of the run's seed (a stream of their own: 0 to 6 are
/// the run's).
pub fn epoch_bounds(
    cfg: &AgentConfig,
    data: &ReplayBuffer,
    rows: usize,
    epochs: usize,
) -> Result<Vec<(&'static str, EpochBound)>> {
    let (od, ad) = (data.obs_dim(), data.act_dim());
    if rows > data.len() {
        return Err(Error::Config(format!("{rows} rows asked, {} recorded", data.len())));
    }
    let Some((prediction, gradient)) = ensemble_specs(cfg.variant, cfg, od, ad) else { return Ok(Vec::new()) };
    let all = data.newest(data.len());
    let transitions = TransitionData {
        obs: &all.obs[..rows * od],
        act: &all.act[..rows * ad],
        rew: &all.rew[..rows],
        next_obs: &all.next_obs[..rows * od],
    };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    rng.set_stream(7);
    let mut out = Vec::new();
    for (name, spec) in [("prediction", Some(prediction)), ("gradient", gradient)] {
        if let Some(s) = spec {
            let bound = gemm_bound::measure(od, ad, &s.config, s.loss.as_ref(), &transitions, epochs, &mut rng)?;
            out.push((name, bound));
        }
    }
    Ok(out)
}
