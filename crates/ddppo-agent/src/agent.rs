//! The training loop of ALGORITHM.md section 1, one env step at a time,
//! following the paper's Algorithm 1: collect, train the models, roll them
//! out into `D_model`, update the critic (`G2`), update the policy (`G1`),
//! evaluate.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ddppo_buffer::{Batch, ReplayBuffer};
use ddppo_env::{Env, EnvFactory, Task, evaluate_episodes};
use ddppo_models::{EnsembleConfig, GradientLossConfig, ModelEnsemble, TransitionData, transfer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::checkpoint::Checkpoints;
use crate::config::{AgentConfig, IntoValidConfig, Variant};
use crate::jacobian_error::JacobianProbe;
use crate::nn::{Adam, upload};
use crate::policy_update::policy_objective;
use crate::rollout::ModelEnv;
use crate::run_state::{AgentRngs, ModelStats, RunState};
use crate::sac::{GaussianPolicy, PolicySnapshot, SacCritic, Temperature};
use crate::variant::{GradientSource, PolicyUpdate, RolloutModel};
use crate::{Error, Result};

/// What one evaluation reports (one line of `metrics.jsonl`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalRecord {
    /// Env steps taken so far.
    pub env_steps: usize,
    /// Mean return of the deterministic evaluation episodes.
    pub return_mean: f64,
    /// Standard deviation (population) of those returns.
    pub return_std: f64,
    /// Mean length of the evaluation episodes.
    pub episode_len_mean: f64,
    /// Return of the last finished training (stochastic) episode.
    pub train_return: Option<f64>,
    /// Wall seconds since the agent was created.
    pub wall_s: f64,
    /// Mean critic loss (equation 12) since the previous evaluation.
    pub critic_loss: Option<f64>,
    /// Mean policy loss (`-J/B` of equation 11, or the SAC policy loss) since the previous evaluation.
    pub policy_loss: Option<f64>,
    /// Current temperature.
    pub alpha: f64,
    /// Last model training: mean training loss of the rollout (prediction) ensemble.
    pub model_loss: Option<f64>,
    /// Last model training: mean elite holdout MSE of the rollout ensemble.
    pub model_holdout_mse: Option<f64>,
    /// Last model training: the gradient model's directional-derivative loss `R`.
    pub grad_loss: Option<f64>,
    /// Epochs run by the rollout ensemble's trainings since the previous
    /// evaluation (0 when none trained); empty for `sac`. With `phase_s`,
    /// what a training costs: a warm start's epochs vary tenfold.
    #[serde(default)]
    pub model_epochs: Option<u64>,
    /// The same for the gradient ensemble (`ddppo`, `double-params`); empty
    /// for the variants without one.
    #[serde(default)]
    pub grad_model_epochs: Option<u64>,
    /// Current model-rollout length `k`.
    pub rollout_length: usize,
    /// Rows in `D_model`.
    pub model_pool: usize,
    /// Updates so far.
    pub critic_updates: u64,
    /// Updates so far.
    pub policy_updates: u64,
    /// Seconds spent per phase so far.
    pub phase_s: PhaseTimes,
    /// Training episodes so far that the simulator ended by diverging
    /// (MuJoCo's instability check): each was cut there as a truncation.
    #[serde(default)]
    pub diverged_episodes: u64,
    /// Of this evaluation's episodes, those cut short by a diverging simulation.
    #[serde(default)]
    pub eval_diverged_episodes: usize,
    /// Jacobian error of the rollout (prediction) ensemble's elites on the
    /// held-out states (`jacobian_error`): MSE of the reward row, of the
    /// dynamics rows, mean cosine of `J v`. Empty before the first model
    /// training, for `sac`, and with `jacobian_states = 0`.
    pub pred_jacobian_mse_reward: Option<f64>,
    /// See `pred_jacobian_mse_reward`.
    pub pred_jacobian_mse_dynamics: Option<f64>,
    /// See `pred_jacobian_mse_reward`.
    pub pred_jacobian_cos: Option<f64>,
    /// The same figures for the ensemble whose derivatives the policy update
    /// uses: `ddppo`'s gradient ensemble; the one ensemble of the other model
    /// variants (then equal to the `pred_` figures), so runs of different
    /// variants compare side by side.
    pub grad_jacobian_mse_reward: Option<f64>,
    /// See `grad_jacobian_mse_reward`.
    pub grad_jacobian_mse_dynamics: Option<f64>,
    /// See `grad_jacobian_mse_reward`.
    pub grad_jacobian_cos: Option<f64>,
    /// Of the rollout ensemble: MSE of the reward row's action columns
    /// `d r / d a` alone, and the mean cosine of the model's `d r / d a`
    /// with the true one (the action cost's derivative).
    #[serde(default)]
    pub pred_jacobian_mse_reward_action: Option<f64>,
    /// See `pred_jacobian_mse_reward_action`.
    #[serde(default)]
    pub pred_jacobian_cos_reward_action: Option<f64>,
    /// The same of the differentiating ensemble.
    #[serde(default)]
    pub grad_jacobian_mse_reward_action: Option<f64>,
    /// See `grad_jacobian_mse_reward_action`.
    #[serde(default)]
    pub grad_jacobian_cos_reward_action: Option<f64>,
    /// Mean `|a_i|` of the deterministic policy's actions over this
    /// evaluation's episodes (all steps, all components).
    #[serde(default)]
    pub eval_action_abs: Option<f64>,
    /// Policy diagnostics on start states from `D_env` ([`crate::policy_probe`]):
    /// mean `|mu|` of the pre-squash Gaussian. Empty while `D_env` is empty.
    #[serde(default)]
    pub policy_mu_abs: Option<f64>,
    /// Mean standard deviation of the pre-squash Gaussian.
    #[serde(default)]
    pub policy_std: Option<f64>,
    /// Norm of the policy objective's gradient, the model rewards' part
    /// (back-propagated update only, after the first model training).
    #[serde(default)]
    pub policy_grad_reward: Option<f64>,
    /// The critic's part (terminal `min Q`, or SAC's `min Q`).
    #[serde(default)]
    pub policy_grad_q: Option<f64>,
    /// The entropy terms' part.
    #[serde(default)]
    pub policy_grad_entropy: Option<f64>,
    /// Action cost `r(s, centre) - r(s, pi(s))` at the probe's states, true
    /// (one env step each); empty before the first model training and for `sac`.
    #[serde(default)]
    pub action_cost_true: Option<f64>,
    /// The same as the rollout ensemble's elites predict it.
    #[serde(default)]
    pub action_cost_pred: Option<f64>,
    /// The same as the differentiating ensemble's elites predict it.
    #[serde(default)]
    pub action_cost_grad: Option<f64>,
    /// Mean absolute reward error of the rollout ensemble's elites at `(s, pi(s))`.
    #[serde(default)]
    pub reward_error_pred: Option<f64>,
    /// The same for the differentiating ensemble's elites.
    #[serde(default)]
    pub reward_error_grad: Option<f64>,
    /// Mean `min Q(s, pi(s))` at 32 probe states (deterministic action);
    /// empty before the first critic update.
    #[serde(default)]
    pub critic_q: Option<f64>,
    /// Mean discounted return of the deterministic policy in the true env
    /// from the same states, over at most 300 steps.
    #[serde(default)]
    pub policy_return: Option<f64>,
}

/// Wall seconds per phase of the loop (for profiling).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PhaseTimes {
    /// Acting in the env and storing transitions.
    pub collect: f64,
    /// Training the ensembles.
    pub model_train: f64,
    /// Model rollouts for `D_model`.
    pub model_rollout: f64,
    /// Critic updates.
    pub critic: f64,
    /// Policy (and temperature) updates.
    pub policy: f64,
    /// Evaluation episodes.
    pub eval: f64,
    /// Jacobian-error diagnostics (including drawing the held-out set once).
    #[serde(default)]
    pub diagnostics: f64,
}

/// The error an [`Observer`] may stop the run with (writing its metrics
/// failed, say); [`Agent::train`] returns it as [`Error::Observer`].
pub type ObserverError = Box<dyn std::error::Error + Send + Sync>;

/// Receives what [`Agent::train`] does, in order: evaluation records,
/// checkpoints written, warnings, and progress after every env step.
pub trait Observer {
    /// After every env step.
    fn on_step(&mut self, _env_steps: usize, _total_steps: usize) {}
    /// After every evaluation; an error ends the run at once (no checkpoint).
    fn on_eval(&mut self, _record: &EvalRecord) -> std::result::Result<(), ObserverError> {
        Ok(())
    }
    /// After a checkpoint was written (complete, under its final name).
    fn on_checkpoint(&mut self, _path: &Path) {}
    /// When something went wrong that the run survives (a diverged simulation).
    fn on_warning(&mut self, _message: &str) {}
}

/// An observer that ignores everything.
pub struct NoObserver;
impl Observer for NoObserver {}

/// The learned models of a variant (section 6): the rollout ensemble and,
/// for `ddppo`, a separate gradient ensemble. Without one, derivatives come
/// from the rollout ensemble's mean.
pub struct LearnedModels {
    /// Rolls out (values).
    pub prediction: ModelEnsemble,
    /// Differentiates, when separate.
    pub gradient: Option<ModelEnsemble>,
}

/// The config of one of a variant's ensembles: its network, and the
/// gradient loss it trains with (`None`: NLL only).
#[derive(Clone, Debug)]
pub struct EnsembleSpec {
    pub config: EnsembleConfig,
    pub loss: Option<GradientLossConfig>,
}

/// A variant's ensembles as the variant table says: the rollout ensemble and
/// the separate gradient ensemble, if any (`None`: no models, `sac`).
pub fn ensemble_specs(
    variant: Variant,
    cfg: &AgentConfig,
    obs_dim: usize,
    act_dim: usize,
) -> Option<(EnsembleSpec, Option<EnsembleSpec>)> {
    let spec = variant.spec();
    let plain = |config: EnsembleConfig| EnsembleSpec { config, loss: None };
    let prediction = match spec.rollout_model {
        RolloutModel::None => return None,
        RolloutModel::Prediction => plain(cfg.model.clone()),
        RolloutModel::Wide => {
            plain(EnsembleConfig { hidden: cfg.double_params_width(obs_dim, act_dim), ..cfg.model.clone() })
        }
        RolloutModel::WithGradientLoss => EnsembleSpec { config: cfg.model.clone(), loss: Some(cfg.gradient.clone()) },
    };
    let gradient = match spec.gradient_source {
        GradientSource::SeparateEnsemble => {
            Some(EnsembleSpec { config: cfg.model.clone(), loss: Some(cfg.gradient.clone()) })
        }
        GradientSource::RolloutMean | GradientSource::None => None,
    };
    Some((prediction, gradient))
}

impl LearnedModels {
    fn new(
        variant: Variant,
        cfg: &AgentConfig,
        obs_dim: usize,
        act_dim: usize,
        device: &Device,
        rng: &mut ChaCha8Rng,
    ) -> Result<Option<Self>> {
        let Some((prediction, gradient)) = ensemble_specs(variant, cfg, obs_dim, act_dim) else { return Ok(None) };
        let mut ensemble = |s: &EnsembleSpec| -> Result<ModelEnsemble> {
            Ok(ModelEnsemble::new(obs_dim, act_dim, &s.config, s.loss.as_ref(), device, DType::F32, rng)?)
        };
        let prediction = ensemble(&prediction)?;
        let gradient = gradient.as_ref().map(&mut ensemble).transpose()?;
        Ok(Some(Self { prediction, gradient }))
    }
}

/// A DDPPO (or baseline) agent: its env, buffers, networks and optimisers
/// (all of them in one parameter tree, [`Agent::params`]) and its
/// [`RunState`]. A checkpoint is these, written whole.
pub struct Agent {
    pub(crate) cfg: AgentConfig,
    pub(crate) task: Task,
    pub(crate) device: Device,
    pub(crate) factory: EnvFactory,
    pub(crate) env: Box<dyn Env>,
    /// `D_env`.
    pub env_buffer: ReplayBuffer,
    /// `D_model`.
    pub model_buffer: ReplayBuffer,
    /// The policy `pi_phi`.
    pub policy: GaussianPolicy,
    /// Twin Q with targets.
    pub critic: SacCritic,
    /// The temperature.
    pub temperature: Temperature,
    /// Policy optimiser (values clipped to `±policy_grad_clip`).
    pub policy_opt: Adam,
    /// Critic optimiser (values clipped to `±critic_grad_clip`).
    pub critic_opt: Adam,
    /// Temperature optimiser.
    pub alpha_opt: Adam,
    /// Learned models (`None` for `sac`).
    pub models: Option<LearnedModels>,
    /// Counters, random streams, the episode in progress, accumulators.
    pub(crate) run: RunState,
    /// The held-out states of the Jacobian diagnostics, drawn when first needed.
    pub(crate) jacobian_probe: Option<JacobianProbe>,
    /// Wall-clock figures: kept apart from the run state, since they differ
    /// between runs that are otherwise identical.
    pub(crate) times: PhaseTimes,
    pub(crate) started: Instant,
    /// `(env_steps, mid_step)` of the newest checkpoint that holds this
    /// agent's current state, if one does (set when saved and when loaded).
    pub(crate) saved: Option<(usize, bool)>,
    /// The last divergence not yet reported ([`Agent::take_warning`]).
    pub(crate) warning: Option<String>,
    /// A cache of the policy's host copy, cleared by every policy update.
    pub(crate) snapshot: Option<PolicySnapshot>,
    pub(crate) batch: Batch,
    pub(crate) interrupt: Option<Arc<AtomicBool>>,
    /// Epochs and seconds of the last model training (`ddppo profile`).
    pub(crate) last_training: Option<crate::profile::ModelTraining>,
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// The result of `f` and its wall seconds.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    (f(), secs(t))
}

fn finite(what: &str, v: f64) -> Result<f64> {
    if v.is_finite() { Ok(v) } else { Err(Error::Diverged(format!("{what} is {v}"))) }
}

impl Agent {
    /// Builds the agent on the CPU; an [`AgentConfig`] is validated first,
    /// a [`crate::ValidConfig`] is trusted.
    pub fn new(cfg: impl IntoValidConfig) -> Result<Self> {
        Self::with_device(cfg, Device::Cpu)
    }

    /// Builds the agent with networks on `device`.
    pub fn with_device(cfg: impl IntoValidConfig, device: Device) -> Result<Self> {
        let cfg = cfg.into_valid()?.into_inner();
        let task = cfg.task()?;
        let factory = EnvFactory::new(task)?;
        let mut env = factory.make()?;
        let (obs_dim, act_dim) = (env.obs_dim(), env.act_dim());
        let mut rngs = AgentRngs::new(cfg.seed);
        let mut init = ChaCha8Rng::seed_from_u64(cfg.seed);
        init.set_stream(0);
        let policy = GaussianPolicy::new(
            obs_dim,
            env.action_low(),
            env.action_high(),
            &cfg.hidden,
            DType::F32,
            &device,
            &mut init,
        )?;
        let critic = SacCritic::new(obs_dim, act_dim, &cfg.hidden, DType::F32, &device, &mut init)?;
        let target_entropy = cfg.target_entropy.unwrap_or(-(act_dim as f64));
        let temperature = Temperature::new(cfg.init_alpha, target_entropy, DType::F32, &device)?;
        let policy_opt = Adam::new(policy.vars(), cfg.policy_lr, Some(cfg.policy_grad_clip))?;
        let critic_opt = Adam::new(critic.vars().to_vec(), cfg.critic_lr, Some(cfg.critic_grad_clip))?;
        let alpha_opt = Adam::new(vec![temperature.var().clone()], cfg.alpha_lr, None)?;
        let models = LearnedModels::new(cfg.variant, &cfg, obs_dim, act_dim, &device, &mut init)?;
        let k0 = cfg.rollout_schedule.length(0);
        let model_buffer = ReplayBuffer::new(obs_dim, act_dim, cfg.model_pool_size(k0));
        let obs = env.reset(rngs.env.random());
        Ok(Self {
            env_buffer: ReplayBuffer::new(obs_dim, act_dim, cfg.replay_size),
            model_buffer,
            batch: Batch::new(cfg.batch_size, obs_dim, act_dim),
            policy,
            critic,
            temperature,
            policy_opt,
            critic_opt,
            alpha_opt,
            models,
            run: RunState::new(rngs, obs, k0),
            task,
            device,
            factory,
            env,
            warning: None,
            snapshot: None,
            times: PhaseTimes::default(),
            started: Instant::now(),
            saved: None,
            jacobian_probe: None,
            interrupt: None,
            last_training: None,
            cfg,
        })
    }

    /// The run's config.
    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// Counters, random streams, the episode in progress, accumulators.
    pub fn run_state(&self) -> &RunState {
        &self.run
    }

    /// Env steps taken.
    pub fn env_steps(&self) -> usize {
        self.run.env_steps
    }

    /// Seconds per phase so far.
    pub fn phase_times(&self) -> PhaseTimes {
        self.times
    }

    /// The outer loop of Algorithm 1, the one `ddppo train` runs: the
    /// evaluation before the first step (unless a checkpoint says it is
    /// written already), then [`Agent::step`] until `epochs * epoch_length`
    /// env steps are done or the interrupt flag ([`Agent::set_interrupt`])
    /// is raised. With `checkpoints`, one is written every `checkpoint_every`
    /// env steps (after that step's evaluation, so a resumed run never misses
    /// a record) and one at the end, the final or the interrupted state,
    /// unless the newest holds it already. Returns this call's evaluation
    /// records; after an interruption [`Agent::finished`] is false.
    pub fn train(&mut self, checkpoints: Option<&Checkpoints>, observer: &mut dyn Observer) -> Result<Vec<EvalRecord>> {
        let total = self.cfg.total_steps();
        let every = self.cfg.checkpoint_every;
        let mut records = Vec::new();
        let mut report = |observer: &mut dyn Observer, r: EvalRecord| -> Result<()> {
            observer.on_eval(&r).map_err(Error::Observer)?;
            records.push(r);
            Ok(())
        };
        if self.run.env_steps == 0 && self.saved.is_none() {
            let r = self.evaluate()?;
            report(observer, r)?;
        }
        while !self.finished() && !self.interrupted() {
            match self.step() {
                Ok(Some(r)) => report(observer, r)?,
                Ok(None) => {}
                Err(Error::Interrupted) => break,
                Err(e) => return Err(e),
            }
            if let Some(w) = self.take_warning() {
                observer.on_warning(&w);
            }
            observer.on_step(self.run.env_steps, total);
            if let Some(c) = checkpoints
                && every > 0
                && self.run.env_steps.is_multiple_of(every)
                && !self.finished()
            {
                observer.on_checkpoint(&c.save(self)?);
            }
        }
        // The same step, on the same side of that step's updates: saved already.
        if let Some(c) = checkpoints
            && self.saved != Some((self.run.env_steps, self.run.mid_step))
        {
            observer.on_checkpoint(&c.save(self)?);
        }
        Ok(records)
    }

    /// Installs a flag (set by a signal handler, say) that stops a model
    /// training between two minibatches: [`Agent::step`] then undoes the
    /// part-done training and returns [`Error::Interrupted`], the agent can be
    /// checkpointed, and the next `step` (also after a resume) finishes the
    /// interrupted one exactly as it would have run. Elsewhere the flag is
    /// not read: a caller checks it between steps.
    pub fn set_interrupt(&mut self, flag: Arc<AtomicBool>) {
        if let Some(m) = self.models.as_mut() {
            m.prediction.set_interrupt(Some(flag.clone()));
            if let Some(g) = m.gradient.as_mut() {
                g.set_interrupt(Some(flag.clone()));
            }
        }
        self.interrupt = Some(flag);
    }

    /// Whether all `epochs * epoch_length` env steps are taken and done.
    pub fn finished(&self) -> bool {
        self.run.env_steps >= self.cfg.total_steps() && !self.run.mid_step
    }

    /// Whether an interrupted step waits to be finished by [`Agent::step`].
    pub fn is_mid_step(&self) -> bool {
        self.run.mid_step
    }

    /// Whether the installed interrupt flag is set.
    pub fn interrupted(&self) -> bool {
        self.interrupt.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// One iteration of Algorithm 1: one env step and everything due after it.
    pub fn step(&mut self) -> Result<Option<EvalRecord>> {
        // Line 4: act in the real env, store the transition in D_env (unless
        // an interrupted step is being finished).
        if !self.run.mid_step {
            let t = Instant::now();
            self.collect()?;
            self.times.collect += secs(t);
            self.run.mid_step = true;
        }

        // Lines 5-11: every model_train_freq steps, train both models on D_env
        // and roll the prediction model out into D_model.
        if self.cfg.variant.spec().uses_model()
            && self.run.env_steps >= self.cfg.min_pool_size
            && self.run.env_steps.is_multiple_of(self.cfg.model_train_freq)
        {
            let t = Instant::now();
            self.train_models()?;
            self.times.model_train += secs(t);
            let t = Instant::now();
            self.rollout_models()?;
            self.times.model_rollout += secs(t);
        }

        let ready = if self.cfg.variant.spec().uses_model() {
            self.run.model_trainings > 0
        } else {
            self.run.env_steps >= self.cfg.min_pool_size
        };
        if ready {
            // Lines 13-15: G2 critic updates (equation 12), capped.
            let t = Instant::now();
            for _ in 0..self.critic_updates_due() {
                self.update_critic()?;
            }
            self.times.critic += secs(t);
            // Lines 16-19: G1 policy updates (equation 11, or SAC's for the baselines).
            let t = Instant::now();
            for _ in 0..self.cfg.policy_updates_per_step {
                self.update_policy()?;
            }
            self.times.policy += secs(t);
        }
        self.run.mid_step = false;

        if self.run.env_steps.is_multiple_of(self.cfg.eval_every) {
            return Ok(Some(self.evaluate()?));
        }
        Ok(None)
    }

    /// The training env (a test hook: puts it in a given state; the agent's
    /// current observation is not updated).
    #[doc(hidden)]
    pub fn env_mut(&mut self) -> &mut dyn Env {
        self.env.as_mut()
    }

    /// A line about the last diverged simulation since the previous call, if
    /// any (for the caller to show; the count is in [`EvalRecord`]).
    pub fn take_warning(&mut self) -> Option<String> {
        self.warning.take()
    }

    fn snapshot(&mut self) -> Result<&PolicySnapshot> {
        if self.snapshot.is_none() {
            self.snapshot = Some(self.policy.snapshot()?);
        }
        self.snapshot.as_ref().ok_or_else(|| Error::Config("no policy snapshot".into()))
    }

    fn collect(&mut self) -> Result<()> {
        let action: Vec<f64> = if self.run.env_steps < self.cfg.start_steps {
            let (lo, hi) = (self.env.action_low().to_vec(), self.env.action_high().to_vec());
            lo.iter().zip(&hi).map(|(l, h)| self.run.rngs.act.random_range(*l..*h)).collect()
        } else {
            let obs = self.run.obs.clone();
            self.snapshot()?;
            let snap = self.snapshot.as_ref().ok_or_else(|| Error::Config("no policy snapshot".into()))?;
            snap.sample_action(&obs, &mut self.run.rngs.act)
        };
        let step = match self.env.step(&action) {
            Ok(step) => step,
            // The simulator reset itself, so there is no next state to
            // store: the step counts, the episode ends as a truncation (its
            // transitions so far stay, bootstrapped), and a new one starts.
            Err(e @ ddppo_env::Error::SimulationDiverged { .. }) => {
                self.run.env_steps += 1;
                self.run.diverged_episodes += 1;
                self.warning = Some(format!(
                    "env step {}: {e}; episode cut there as a truncation ({} so far)",
                    self.run.env_steps, self.run.diverged_episodes
                ));
                self.run.episode_return = 0.0;
                self.run.obs = self.env.reset(self.run.rngs.env.random());
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let f = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
        // mask = 0 only on a true terminal; a time-limit truncation bootstraps.
        let mask = if step.terminated { 0.0 } else { 1.0 };
        let done = if step.terminated || step.truncated { 1.0 } else { 0.0 };
        self.env_buffer.push(&f(&self.run.obs), &f(&action), step.reward as f32, &f(&step.obs), mask, done)?;
        self.run.episode_return += step.reward;
        self.run.env_steps += 1;
        if step.terminated || step.truncated {
            self.run.last_train_return = Some(self.run.episode_return);
            self.run.episode_return = 0.0;
            self.run.obs = self.env.reset(self.run.rngs.env.random());
        } else {
            self.run.obs = step.obs;
        }
        Ok(())
    }

    /// Trains the ensembles on all of `D_env` (Algorithm 1 lines 5-6).
    pub fn train_models(&mut self) -> Result<()> {
        let Some(models) = self.models.as_mut() else {
            return Ok(());
        };
        let cols = self.env_buffer.newest(self.env_buffer.len());
        let data = TransitionData { obs: &cols.obs, act: &cols.act, rew: &cols.rew, next_obs: &cols.next_obs };
        // An interrupted training is undone in full, both ensembles and the
        // model stream, so that it can run again after a resume.
        let undo = match &self.interrupt {
            Some(_) => Some((
                models.prediction.training_snapshot()?,
                models.gradient.as_ref().map(|g| g.training_snapshot()).transpose()?,
                self.run.rngs.model.clone(),
            )),
            None => None,
        };
        let train = |ens: &mut ModelEnsemble, rng: &mut ChaCha8Rng| -> Result<ddppo_models::TrainReport> {
            match ens.train(&data, rng) {
                Err(ddppo_models::Error::Interrupted) => Err(Error::Interrupted),
                r => Ok(r?),
            }
        };
        // The two ensembles are independent: train them on two threads, the
        // gradient ensemble with its own generator seeded from the model stream.
        let (report, gradient_report) = match models.gradient.as_mut() {
            Some(g) => {
                let mut gradient_rng = ChaCha8Rng::from_seed(self.run.rngs.model.random::<[u8; 32]>());
                let prediction = &mut models.prediction;
                let model_rng = &mut self.run.rngs.model;
                std::thread::scope(|scope| {
                    let handle = scope.spawn(|| timed(|| train(g, &mut gradient_rng)));
                    let p = timed(|| train(prediction, model_rng));
                    let g = handle
                        .join()
                        .unwrap_or_else(|_| (Err(Error::Diverged("gradient-model training panicked".into())), 0.0));
                    (p, Some(g))
                })
            }
            None => (timed(|| train(&mut models.prediction, &mut self.run.rngs.model)), None),
        };
        let interrupted = |r: &(Result<_>, f64)| matches!(r.0, Err(Error::Interrupted));
        if interrupted(&report) || gradient_report.as_ref().is_some_and(interrupted) {
            if let Some((p, g, rng)) = undo {
                models.prediction.restore_training_snapshot(&p)?;
                if let (Some(ens), Some(s)) = (models.gradient.as_mut(), g) {
                    ens.restore_training_snapshot(&s)?;
                }
                self.run.rngs.model = rng;
            }
            return Err(Error::Interrupted);
        }
        let (report, prediction_s) = (report.0?, report.1);
        // Mean holdout MSE of an ensemble's elites.
        let elite_holdout = |ens: &ModelEnsemble, r: &ddppo_models::TrainReport| {
            let elites = ens.ensemble().elites();
            elites.iter().map(|&e| r.holdout_mse.get(e).copied().unwrap_or(f64::NAN)).sum::<f64>()
                / elites.len().max(1) as f64
        };
        let holdout = elite_holdout(&models.prediction, &report);
        self.run.model_epochs[0] += report.epochs as u64;
        // The `grad_loss` column: R of the ensemble trained with it.
        let mut stats =
            ModelStats { loss: Some(report.train_loss), holdout: Some(holdout), grad: report.derivative_loss };
        let mut training = crate::profile::ModelTraining {
            prediction: crate::profile::EnsembleTraining {
                epochs: report.epochs,
                seconds: prediction_s,
                holdout_mse: holdout,
            },
            gradient: None,
        };
        if let Some((gr, gradient_s)) = gradient_report {
            let gr = gr?;
            stats.grad = gr.derivative_loss;
            self.run.model_epochs[1] += gr.epochs as u64;
            let holdout_mse = models.gradient.as_ref().map_or(f64::NAN, |g| elite_holdout(g, &gr));
            training.gradient =
                Some(crate::profile::EnsembleTraining { epochs: gr.epochs, seconds: gradient_s, holdout_mse });
        }
        self.last_training = Some(training);
        self.run.model_stats = stats;
        self.run.model_trainings += 1;
        Ok(())
    }

    /// Section 1 step 3: set `k`, resize `D_model`, and push `k`-step rollouts
    /// of the current (stochastic) policy on the rollout model from
    /// `rollout_batch_size` states of `D_env`, dropping terminated rows
    /// ([`ModelEnv::rollout_into`]).
    pub fn rollout_models(&mut self) -> Result<()> {
        let Some(env) = self.model_env()? else {
            return Ok(());
        };
        let epoch = self.run.env_steps / self.cfg.epoch_length;
        let k = self.cfg.rollout_schedule.length(epoch);
        self.run.rollout_length = k;
        let pool = self.cfg.model_pool_size(k);
        if self.model_buffer.capacity() != pool {
            self.model_buffer.resize(pool);
        }
        let starts = self.cfg.rollout_batch_size;
        env.rollout_into(&self.policy, &self.env_buffer, starts, k, &mut self.run.rngs.model, &mut self.model_buffer)
    }

    /// The model env of the learned models as the variant table says (`None` without models).
    pub(crate) fn model_env(&self) -> Result<Option<ModelEnv<'static>>> {
        let source = self.cfg.variant.spec().gradient_source;
        self.models.as_ref().map(|m| ModelEnv::of_models(m, source, self.task)).transpose()
    }

    fn critic_updates_due(&self) -> usize {
        let cap = self.cfg.max_train_repeat_per_step as u64
            * self.run.env_steps.saturating_sub(self.cfg.min_pool_size).max(1) as u64;
        let room = cap.saturating_sub(self.run.critic_updates);
        (self.cfg.critic_updates_per_step as u64).min(room) as usize
    }

    /// Draws a batch: the `real_ratio` mix of `D_env` and `D_model`, or only
    /// `D_env` for `sac`.
    fn draw_batch(&mut self) -> Result<()> {
        // Without a model there is no `D_model` to mix in.
        if !self.cfg.variant.spec().uses_model() {
            self.env_buffer.try_sample_into(&mut self.run.rngs.update, &mut self.batch)?;
        } else {
            ddppo_buffer::try_sample_mixed(
                &self.env_buffer,
                &self.model_buffer,
                self.cfg.real_ratio,
                &mut self.run.rngs.update,
                &mut self.batch,
            )?;
        }
        Ok(())
    }

    fn batch_tensors(&self) -> Result<[Tensor; 5]> {
        let (b, od, ad) = (self.batch.size, self.env_buffer.obs_dim(), self.env_buffer.act_dim());
        let d = &self.device;
        Ok([
            upload(&self.batch.obs, b, od, DType::F32, d)?,
            upload(&self.batch.act, b, ad, DType::F32, d)?,
            Tensor::from_slice(&self.batch.rew, b, d)?,
            upload(&self.batch.next_obs, b, od, DType::F32, d)?,
            Tensor::from_slice(&self.batch.mask, b, d)?,
        ])
    }

    /// One critic update (equation 12), then the Polyak target update.
    pub fn update_critic(&mut self) -> Result<()> {
        self.draw_batch()?;
        let [obs, act, rew, next_obs, mask] = self.batch_tensors()?;
        let alpha = self.temperature.alpha()?;
        let (loss, [g1, g2]) = self.critic.loss_and_grads(
            &self.policy,
            &obs,
            &act,
            &rew,
            &next_obs,
            &mask,
            alpha,
            self.cfg.gamma,
            &mut self.run.rngs.update,
        )?;
        self.run.critic_loss.add(finite("critic loss", loss.to_scalar::<f32>()? as f64)?);
        self.critic_opt.step_with(|var| g1.get(var.as_tensor()).or_else(|| g2.get(var.as_tensor())).cloned())?;
        self.critic.update_targets(self.cfg.tau)?;
        self.run.critic_updates += 1;
        Ok(())
    }

    fn update_temperature(&mut self, logp: &Tensor) -> Result<()> {
        if self.cfg.learn_alpha {
            let loss = self.temperature.loss(logp)?;
            self.alpha_opt.backward_step(&loss)?;
        }
        Ok(())
    }

    /// One policy update of the kind the variant table gives the variant.
    pub fn update_policy(&mut self) -> Result<()> {
        match self.cfg.variant.spec().policy_update {
            PolicyUpdate::ThroughModel => self.update_policy_through_model(),
            PolicyUpdate::Sac => self.update_policy_sac(),
        }
    }

    /// One policy update by back-propagating equation 11 through `H` model
    /// steps (section 4), then the temperature (equation 13).
    pub fn update_policy_through_model(&mut self) -> Result<()> {
        let Some(env) = self.model_env()? else {
            return Err(Error::Config("back-prop policy update without a model".into()));
        };
        self.env_buffer.try_sample_into(&mut self.run.rngs.update, &mut self.batch)?;
        let (b, od) = (self.batch.size, self.env_buffer.obs_dim());
        let start = upload(&self.batch.obs, b, od, DType::F32, &self.device)?;
        let alpha = self.temperature.alpha()?;
        let (h, gamma) = (self.cfg.horizon, self.cfg.gamma);
        let out =
            policy_objective(&self.policy, &self.critic, &env, &start, h, gamma, alpha, &mut self.run.rngs.update)?;
        let loss = out.objective.neg()?;
        self.run.policy_loss.add(finite("policy loss", transfer::download_scalar(&loss)?)?);
        self.policy_opt.backward_step(&loss)?;
        self.snapshot = None;
        self.run.policy_updates += 1;
        self.update_temperature(&out.logp0)
    }

    /// The SAC policy loss `mean(alpha log pi(a|s) - min Q(s, a))` on a
    /// critic-style batch (`mbpo`, `sac`), then the temperature.
    pub fn update_policy_sac(&mut self) -> Result<()> {
        self.draw_batch()?;
        let (b, od) = (self.batch.size, self.env_buffer.obs_dim());
        let obs = upload(&self.batch.obs, b, od, DType::F32, &self.device)?;
        let alpha = self.temperature.alpha()?;
        let sample = self.policy.sample(&obs, &mut self.run.rngs.update)?;
        let q = self.critic.min_q_frozen(&obs, &sample.action)?;
        let loss = ((&sample.logp * alpha)? - q)?.mean_all()?;
        self.run.policy_loss.add(finite("policy loss", transfer::download_scalar(&loss)?)?);
        self.policy_opt.backward_step(&loss)?;
        self.snapshot = None;
        self.run.policy_updates += 1;
        self.update_temperature(&sample.logp.detach())
    }

    /// Evaluates the deterministic policy on `eval_episodes` episodes (fixed,
    /// separately seeded envs, on worker threads) and returns the record.
    pub fn evaluate(&mut self) -> Result<EvalRecord> {
        let t = Instant::now();
        let snap = self.snapshot()?.clone();
        let summary = evaluate_policy(&self.factory, &self.cfg, snap, self.cfg.eval_episodes)?;
        self.times.eval += secs(t);
        let t = Instant::now();
        let (pred, grad) = self.jacobian_errors()?;
        let probe = self.policy_probe()?;
        self.times.diagnostics += secs(t);
        let epochs = std::mem::take(&mut self.run.model_epochs);
        Ok(EvalRecord {
            env_steps: self.run.env_steps,
            return_mean: summary.return_mean,
            return_std: summary.return_std,
            episode_len_mean: summary.episode_len_mean,
            train_return: self.run.last_train_return,
            wall_s: secs(self.started),
            critic_loss: self.run.critic_loss.take(),
            policy_loss: self.run.policy_loss.take(),
            alpha: self.temperature.alpha()?,
            model_loss: self.run.model_stats.loss,
            model_holdout_mse: self.run.model_stats.holdout,
            grad_loss: self.run.model_stats.grad,
            model_epochs: self.models.as_ref().map(|_| epochs[0]),
            grad_model_epochs: self.models.as_ref().and_then(|m| m.gradient.as_ref()).map(|_| epochs[1]),
            rollout_length: self.run.rollout_length,
            model_pool: self.model_buffer.len(),
            critic_updates: self.run.critic_updates,
            policy_updates: self.run.policy_updates,
            phase_s: self.times,
            diverged_episodes: self.run.diverged_episodes,
            eval_diverged_episodes: summary.diverged,
            pred_jacobian_mse_reward: pred.map(|e| e.mse_reward),
            pred_jacobian_mse_dynamics: pred.map(|e| e.mse_dynamics),
            pred_jacobian_cos: pred.map(|e| e.cos),
            grad_jacobian_mse_reward: grad.map(|e| e.mse_reward),
            grad_jacobian_mse_dynamics: grad.map(|e| e.mse_dynamics),
            grad_jacobian_cos: grad.map(|e| e.cos),
            pred_jacobian_mse_reward_action: pred.map(|e| e.mse_reward_action),
            pred_jacobian_cos_reward_action: pred.map(|e| e.cos_reward_action),
            grad_jacobian_mse_reward_action: grad.map(|e| e.mse_reward_action),
            grad_jacobian_cos_reward_action: grad.map(|e| e.cos_reward_action),
            eval_action_abs: Some(summary.action_abs_mean),
            policy_mu_abs: probe.map(|p| p.mu_abs),
            policy_std: probe.map(|p| p.std),
            policy_grad_reward: probe.and_then(|p| p.grad_norm_reward),
            policy_grad_q: probe.and_then(|p| p.grad_norm_q),
            policy_grad_entropy: probe.and_then(|p| p.grad_norm_entropy),
            action_cost_true: probe.and_then(|p| p.action_cost_true),
            action_cost_pred: probe.and_then(|p| p.action_cost_pred),
            action_cost_grad: probe.and_then(|p| p.action_cost_grad),
            reward_error_pred: probe.and_then(|p| p.reward_error_pred),
            reward_error_grad: probe.and_then(|p| p.reward_error_grad),
            critic_q: probe.and_then(|p| p.critic_q),
            policy_return: probe.and_then(|p| p.policy_return),
        })
    }
}

/// Returns of a set of deterministic evaluation episodes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalSummary {
    /// Episodes run.
    pub episodes: usize,
    /// Mean return.
    pub return_mean: f64,
    /// Standard deviation (population) of the returns.
    pub return_std: f64,
    /// Mean episode length.
    pub episode_len_mean: f64,
    /// Episodes cut short by a diverged simulation (their returns count up
    /// to that step).
    pub diverged: usize,
    /// Mean `|a_i|` over every step and action component of the episodes.
    pub action_abs_mean: f64,
}

/// Runs `episodes` deterministic (mean-action) episodes of `policy` on envs
/// seeded from the run's seed, on `cfg.eval_workers` threads. Episode `i`
/// always gets the same env seed, so the first `cfg.eval_episodes` episodes
/// are the ones of the run's own evaluations.
pub fn evaluate_policy(
    factory: &EnvFactory,
    cfg: &AgentConfig,
    policy: PolicySnapshot,
    episodes: usize,
) -> Result<EvalSummary> {
    let base_seed = cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1 << 40);
    let act = move |o: &[f64]| policy.mean_action(o);
    let stats = evaluate_episodes(factory, &act, episodes, base_seed, cfg.eval_workers)?;
    let n = stats.len().max(1) as f64;
    let mean = stats.iter().map(|s| s.ret).sum::<f64>() / n;
    let var = stats.iter().map(|s| (s.ret - mean).powi(2)).sum::<f64>() / n;
    Ok(EvalSummary {
        episodes: stats.len(),
        return_mean: mean,
        return_std: var.sqrt(),
        episode_len_mean: stats.iter().map(|s| s.len as f64).sum::<f64>() / n,
        diverged: stats.iter().filter(|s| s.diverged).count(),
        action_abs_mean: stats.iter().map(|s| s.action_abs).sum::<f64>()
            / stats.iter().map(|s| s.len).sum::<usize>().max(1) as f64,
    })
}
