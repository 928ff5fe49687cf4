//! The typed run configuration: every knob of ALGORITHM.md sections 1-7,
//! read from TOML (`deny_unknown_fields`) and validated with one-line errors.
//! The per-task presets (Table 1 of the paper) live in this package's
//! `configs/*.toml` (the repository's top-level `configs` links to it) and are
//! compiled in ([`AgentConfig::preset`]). A run's config is a base (preset
//! or file) plus [`Overrides`], validated once into a [`ValidConfig`].

use std::path::Path;

use ddppo_env::Task;
use ddppo_models::{EnsembleConfig, GradientLossConfig};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub use crate::variant::Variant;

/// The rollout-length schedule `[min_epoch, max_epoch, min_len, max_len]`:
/// `k` grows linearly from `min_len` at `min_epoch` to `max_len` at
/// `max_epoch`, clamped (section 1 step 3).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutSchedule(pub [usize; 4]);

impl RolloutSchedule {
    /// The model-rollout length `k` in `epoch` (0-based).
    pub fn length(&self, epoch: usize) -> usize {
        let [e0, e1, l0, l1] = self.0;
        if e1 <= e0 {
            return if epoch >= e1 { l1 } else { l0 };
        }
        let frac = (epoch as f64 - e0 as f64) / (e1 - e0) as f64;
        let k = l0 as f64 + frac * (l1 as f64 - l0 as f64);
        let (lo, hi) = (l0.min(l1) as f64, l0.max(l1) as f64);
        k.clamp(lo, hi) as usize
    }
}

/// One training run. Field defaults are ALGORITHM.md's (MBPO's / the paper's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Task name (`inverted-pendulum`, `hopper`, ..., `pendulum`, `linear`).
    pub task: String,
    /// Algorithm (section 6).
    pub variant: Variant,
    /// Seed of every random stream of the run.
    pub seed: u64,
    /// Number of epochs; the run lasts `epochs * epoch_length` env steps.
    pub epochs: usize,
    /// Env steps per epoch (1000).
    pub epoch_length: usize,
    /// Warm-up env steps with uniform random actions (5000; 200 for InvertedPendulum).
    pub start_steps: usize,
    /// `D_env` size before any model training or update.
    pub min_pool_size: usize,
    /// Capacity of `D_env`.
    pub replay_size: usize,
    /// Env steps between model trainings (250).
    pub model_train_freq: usize,
    /// Model rollouts started per model training (100 000).
    pub rollout_batch_size: usize,
    /// `[min_epoch, max_epoch, min_len, max_len]` of the rollout length `k`.
    pub rollout_schedule: RolloutSchedule,
    /// Epochs of model rollouts `D_model` retains.
    pub retain_epochs: usize,
    /// Fraction of each critic batch drawn from `D_env` (0.05).
    pub real_ratio: f64,
    /// `G1`: policy updates per env step.
    pub policy_updates_per_step: usize,
    /// `G2`: critic updates per env step.
    pub critic_updates_per_step: usize,
    /// Cap: total critic updates never exceed this times `(env_steps - min_pool_size)`.
    pub max_train_repeat_per_step: usize,
    /// `H`: model transitions in the policy objective (equation 11).
    pub horizon: usize,
    /// Batch size of critic and policy updates (256).
    pub batch_size: usize,
    /// Discount.
    pub gamma: f64,
    /// Polyak rate of the target critics.
    pub tau: f64,
    /// Learning rates.
    pub critic_lr: f64,
    /// Policy learning rate.
    pub policy_lr: f64,
    /// Temperature learning rate.
    pub alpha_lr: f64,
    /// Initial temperature.
    pub init_alpha: f64,
    /// Learn the temperature (otherwise it stays at `init_alpha`).
    pub learn_alpha: bool,
    /// Target entropy; `None` means `-dim(A)`.
    pub target_entropy: Option<f64>,
    /// Critic gradient values are clipped to `±critic_grad_clip` (100).
    pub critic_grad_clip: f64,
    /// Policy gradient values are clipped to `±policy_grad_clip` (5).
    pub policy_grad_clip: f64,
    /// Hidden widths of the policy and of each Q network.
    pub hidden: Vec<usize>,
    /// Env steps between evaluations (1000).
    pub eval_every: usize,
    /// Deterministic evaluation episodes (10).
    pub eval_episodes: usize,
    /// Threads running the evaluation episodes.
    pub eval_workers: usize,
    /// Env steps between checkpoints of `ddppo train` (0: only at the end of
    /// the run; one is always written at the end).
    pub checkpoint_every: usize,
    /// Hidden width of the single ensemble of `double-params` (`None`: chosen
    /// so the parameter count is about twice `model.hidden`'s).
    pub double_params_hidden: Option<usize>,
    /// Held-out random-policy states on which every evaluation measures the
    /// models' Jacobian error against the true step Jacobians (0: off; see
    /// `jacobian_error`). Never changes the training itself.
    pub jacobian_states: usize,
    /// Random unit directions per held-out state for the cosine figure.
    pub jacobian_directions: usize,
    /// The ensembles (section 2).
    pub model: EnsembleConfig,
    /// The gradient loss `n`, `w` (section 3).
    pub gradient: GradientLossConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            task: "inverted-pendulum".into(),
            variant: Variant::Ddppo,
            seed: 0,
            epochs: 15,
            epoch_length: 1000,
            start_steps: 5000,
            min_pool_size: 5000,
            replay_size: 1_000_000,
            model_train_freq: 250,
            rollout_batch_size: 100_000,
            rollout_schedule: RolloutSchedule([20, 100, 1, 1]),
            retain_epochs: 1,
            real_ratio: 0.05,
            policy_updates_per_step: 10,
            critic_updates_per_step: 10,
            max_train_repeat_per_step: 10,
            horizon: 3,
            batch_size: 256,
            gamma: 0.99,
            tau: 0.005,
            critic_lr: 3e-4,
            policy_lr: 3e-4,
            alpha_lr: 3e-4,
            init_alpha: 1.0,
            learn_alpha: true,
            target_entropy: None,
            critic_grad_clip: 100.0,
            policy_grad_clip: 5.0,
            hidden: vec![256, 256],
            eval_every: 1000,
            eval_episodes: 10,
            eval_workers: 2,
            checkpoint_every: 5000,
            double_params_hidden: None,
            jacobian_states: 256,
            jacobian_directions: 8,
            model: EnsembleConfig::default(),
            gradient: GradientLossConfig::default(),
        }
    }
}

/// The command line's changes to a base config ([`AgentConfig::resolve`]).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--env`: the task.
    pub task: Option<String>,
    /// `--variant`.
    pub variant: Option<Variant>,
    /// `--seed`.
    pub seed: Option<u64>,
    /// Each `--set KEY=VALUE`, applied in order after the three above.
    pub sets: Vec<String>,
}

/// A config that passed [`AgentConfig::validate`]: the agent builds from it
/// without checking it again. Read-only, so it stays valid.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidConfig(AgentConfig);

impl ValidConfig {
    /// The config itself.
    pub fn into_inner(self) -> AgentConfig {
        self.0
    }
}

impl std::ops::Deref for ValidConfig {
    type Target = AgentConfig;
    fn deref(&self) -> &AgentConfig {
        &self.0
    }
}

/// What [`crate::Agent::new`] accepts: a [`ValidConfig`] as it is, an
/// [`AgentConfig`] after validating it.
pub trait IntoValidConfig {
    /// The validated config.
    fn into_valid(self) -> Result<ValidConfig>;
}

impl IntoValidConfig for ValidConfig {
    fn into_valid(self) -> Result<ValidConfig> {
        Ok(self)
    }
}

impl IntoValidConfig for AgentConfig {
    fn into_valid(self) -> Result<ValidConfig> {
        self.validated()
    }
}

const PRESETS: [(&str, &str); 7] = [
    ("inverted-pendulum", include_str!("../configs/inverted-pendulum.toml")),
    ("hopper", include_str!("../configs/hopper.toml")),
    ("walker2d", include_str!("../configs/walker2d.toml")),
    ("half-cheetah", include_str!("../configs/half-cheetah.toml")),
    ("ant", include_str!("../configs/ant.toml")),
    ("humanoid", include_str!("../configs/humanoid.toml")),
    ("pendulum", include_str!("../configs/pendulum.toml")),
];

/// The table at `path` in `tree` (created where missing), or the name of the
/// first step that holds something else.
fn table_at<'a>(tree: &'a mut toml::Table, path: &[&'a str]) -> std::result::Result<&'a mut toml::Table, &'a str> {
    let mut node = tree;
    for &table in path {
        node =
            node.entry(table).or_insert_with(|| toml::Value::Table(Default::default())).as_table_mut().ok_or(table)?;
    }
    Ok(node)
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Config(msg.into())
}

/// Most env steps a run may take (`epochs x epoch_length`); also the bound
/// of every other count of env steps.
pub const MAX_TOTAL_STEPS: usize = 1_000_000_000;
/// Most deterministic episodes per evaluation (`eval_episodes`, `ddppo eval --episodes`).
pub const MAX_EVAL_EPISODES: usize = 10_000;
/// Most evaluation threads.
pub const MAX_EVAL_WORKERS: usize = 256;
/// Most policy or critic updates per env step (`G1`, `G2`, the repeat cap).
pub const MAX_UPDATES_PER_STEP: usize = 1_000;
/// Longest policy-objective horizon `H` (the paper uses 1 to 3).
pub const MAX_HORIZON: usize = 100;
/// Largest update batch.
pub const MAX_BATCH: usize = 65_536;
/// Most hidden layers of the policy and Q networks.
pub const MAX_LAYERS: usize = 16;
/// Widest hidden layer (policy, Q networks, `double_params_hidden`).
pub const MAX_WIDTH: usize = 16_384;
/// Longest model rollout `k` (an episode is at most 1000 steps).
pub const MAX_ROLLOUT_LENGTH: usize = 1_000;
/// Most rows of `D_model` (and model rollouts per training).
pub const MAX_MODEL_POOL: usize = 1_000_000_000;

fn in_range(name: &str, v: usize, lo: usize, hi: usize) -> Result<()> {
    if (lo..=hi).contains(&v) { Ok(()) } else { Err(bad(format!("{name} must be in {lo}..={hi}, got {v}"))) }
}

impl AgentConfig {
    /// Parses and validates TOML; unknown keys and wrong types are errors naming the key.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let cfg = Self::parse(text, "<string>")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg = Self::parse_file(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a TOML file without validating the values: for a caller that
    /// validates after its overrides ([`AgentConfig::resolve`]), or that
    /// compares it with a config validated already.
    pub fn parse_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, origin: &str) -> Result<Self> {
        toml::from_str(text).map_err(|source| Error::ConfigParse { path: origin.into(), source })
    }

    /// The compiled-in preset of a task (the `configs/<task>.toml` file).
    /// Not validated here: every preset is valid (the config tests check
    /// each), and the run validates its resolved config once.
    pub fn preset(task: &str) -> Result<Self> {
        let (_, text) = PRESETS.iter().find(|(n, _)| *n == task).ok_or_else(|| {
            let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
            bad(format!("no preset for task `{task}`; presets: {}", names.join(", ")))
        })?;
        Self::parse(text, &format!("configs/{task}.toml"))
    }

    /// Applies the command line's overrides to this base config, in the
    /// order task, variant, seed, then each `--set`, and validates the result:
    /// the one validation of a run's config.
    pub fn resolve(mut self, overrides: &Overrides) -> Result<ValidConfig> {
        if let Some(task) = &overrides.task {
            self.task.clone_from(task);
        }
        if let Some(variant) = overrides.variant {
            self.variant = variant;
        }
        if let Some(seed) = overrides.seed {
            self.seed = seed;
        }
        for assignment in &overrides.sets {
            self.set(assignment)?;
        }
        self.validated()
    }

    /// Applies one `key=value` (dotted for tables: `model.lr=3e-4`). The
    /// value is read as a TOML value (number, bool, array, quoted string),
    /// else taken as a bare string; the bare word `none` unsets an optional
    /// key (`model.warm_max_epochs=none`: a branch of a run with the warm
    /// cap trains without it; the string "none" is `key="none"`). A key the
    /// config does not have, a value of the wrong type, or `none` for a key
    /// that is not optional is an error naming it. Not validated.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let syntax = |what: &str| Error::Override(format!("--set {assignment}: {what}"));
        let (key, raw) = assignment.split_once('=').ok_or_else(|| syntax("expected KEY=VALUE"))?;
        let value = (raw.trim() != "none").then(|| {
            toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()))
        });
        let mut path: Vec<&str> = key.trim().split('.').collect();
        let last = path.pop().filter(|k| !k.is_empty()).ok_or_else(|| syntax("empty key"))?;
        // The typed config as a value tree: serde then checks the one new
        // value (and rejects an unknown key) exactly as it checks a file.
        let serialise =
            |c: &Self| toml::Table::try_from(c).map_err(|e| bad(format!("cannot serialise the config: {e}")));
        let not_table = |t: &str| syntax(&format!("`{t}` is not a table"));
        let mut tree = serialise(self)?;
        let node = table_at(&mut tree, &path).map_err(not_table)?;
        // The message names the value but not its key (serde's value
        // deserialiser has no position), hence the assignment in front.
        let invalid = |e: toml::de::Error| bad(format!("--set {assignment}: {}", e.message()));
        let parse = |tree: toml::Table| Self::deserialize(tree).map_err(invalid);
        let Some(value) = value else {
            // An optional key that is set serialises; one that is not does
            // not, nor does an unknown key: a probe value tells them apart.
            if node.remove(last).is_none() {
                let mut probe = tree.clone();
                table_at(&mut probe, &path)
                    .map_err(not_table)?
                    .insert(last.to_string(), toml::Value::Table(Default::default()));
                if let Err(e) = Self::deserialize(probe)
                    && e.message().starts_with("unknown field")
                {
                    return Err(invalid(e));
                }
            }
            let unset = parse(tree)?;
            // A key that is not optional comes back with its default.
            let mut again = serialise(&unset)?;
            if table_at(&mut again, &path).is_ok_and(|n| n.contains_key(last)) {
                return Err(syntax(&format!("`{}` is not optional; give it a value", key.trim())));
            }
            *self = unset;
            return Ok(());
        };
        node.insert(last.to_string(), value);
        *self = parse(tree)?;
        Ok(())
    }

    /// Checks the config once ([`AgentConfig::validate`]) and marks it so.
    pub fn validated(self) -> Result<ValidConfig> {
        self.validate()?;
        Ok(ValidConfig(self))
    }

    /// Serialises to TOML (for writing the resolved config next to a run).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| bad(format!("cannot serialise config: {e}")))
    }

    /// The task, parsed.
    pub fn task(&self) -> Result<Task> {
        Ok(Task::from_name(&self.task)?)
    }

    /// Total env steps of the run.
    pub fn total_steps(&self) -> usize {
        // Bounded by validation; saturating for a config that skipped it.
        self.epochs.saturating_mul(self.epoch_length)
    }

    /// Capacity of `D_model` for rollout length `k`:
    /// `retain_epochs * rollout_batch_size * epoch_length / model_train_freq * k`.
    pub fn model_pool_size(&self, k: usize) -> usize {
        let rollouts_per_epoch = self.rollout_batch_size * self.epoch_length / self.model_train_freq;
        self.retain_epochs * rollouts_per_epoch * k
    }

    /// The hidden width of the `double-params` ensemble: the `h'` whose
    /// parameter count (`in h + (L-1) h^2 + h out`, biases included) is closest
    /// to twice that of `model.hidden`.
    pub fn double_params_width(&self, obs_dim: usize, act_dim: usize) -> usize {
        if let Some(h) = self.double_params_hidden {
            return h;
        }
        let (i, o, l) = (obs_dim + act_dim, 2 * (obs_dim + 1), self.model.hidden_layers.max(1));
        let count = |h: usize| i * h + h + (l - 1) * (h * h + h) + h * o + o;
        let target = 2 * count(self.model.hidden);
        (self.model.hidden..=4 * self.model.hidden.max(1))
            .min_by_key(|&h| count(h).abs_diff(target))
            .unwrap_or(self.model.hidden)
    }

    /// Checks every value against the range the code can run, once, when the
    /// config is resolved (before a run directory is written); the error
    /// names the first bad key. The bounds are listed in the presets' comments.
    pub fn validate(&self) -> Result<()> {
        Task::from_name(&self.task)?;
        // The config is stored as TOML, whose integers are i64.
        if i64::try_from(self.seed).is_err() {
            return Err(bad(format!("seed must be at most {}, got {}", i64::MAX, self.seed)));
        }
        let steps = MAX_TOTAL_STEPS;
        let counts = [
            ("epochs", self.epochs, 1, steps),
            ("epoch_length", self.epoch_length, 1, steps),
            ("start_steps", self.start_steps, 0, steps),
            ("replay_size", self.replay_size, 1, steps),
            ("model_train_freq", self.model_train_freq, 1, steps),
            ("rollout_batch_size", self.rollout_batch_size, 1, MAX_MODEL_POOL),
            ("retain_epochs", self.retain_epochs, 1, steps),
            ("policy_updates_per_step", self.policy_updates_per_step, 0, MAX_UPDATES_PER_STEP),
            ("critic_updates_per_step", self.critic_updates_per_step, 0, MAX_UPDATES_PER_STEP),
            ("max_train_repeat_per_step", self.max_train_repeat_per_step, 0, MAX_UPDATES_PER_STEP),
            ("horizon (H)", self.horizon, 1, MAX_HORIZON),
            ("batch_size", self.batch_size, 1, MAX_BATCH),
            ("eval_every", self.eval_every, 1, steps),
            ("eval_episodes", self.eval_episodes, 1, MAX_EVAL_EPISODES),
            ("eval_workers", self.eval_workers, 1, MAX_EVAL_WORKERS),
            ("checkpoint_every", self.checkpoint_every, 0, steps),
        ];
        for (name, v, lo, hi) in counts {
            in_range(name, v, lo, hi)?;
        }
        match self.epochs.checked_mul(self.epoch_length) {
            Some(total) if total <= steps => {}
            _ => {
                return Err(bad(format!(
                    "epochs x epoch_length must be at most {steps} env steps, got {} x {}",
                    self.epochs, self.epoch_length
                )));
            }
        }
        if self.min_pool_size == 0 {
            return Err(bad("min_pool_size must be at least 1 (the first update needs data)"));
        }
        if self.min_pool_size > self.replay_size {
            return Err(bad(format!(
                "min_pool_size ({}) exceeds replay_size ({})",
                self.min_pool_size, self.replay_size
            )));
        }
        if !(0.0..=1.0).contains(&self.real_ratio) {
            return Err(bad(format!("real_ratio must be in [0, 1], got {}", self.real_ratio)));
        }
        if !(self.gamma > 0.0 && self.gamma <= 1.0) {
            return Err(bad(format!("gamma must be in (0, 1], got {}", self.gamma)));
        }
        if !(self.tau > 0.0 && self.tau <= 1.0) {
            return Err(bad(format!("tau must be in (0, 1], got {}", self.tau)));
        }
        for (name, v) in [
            ("critic_lr", self.critic_lr),
            ("policy_lr", self.policy_lr),
            ("alpha_lr", self.alpha_lr),
            ("init_alpha", self.init_alpha),
            ("critic_grad_clip", self.critic_grad_clip),
            ("policy_grad_clip", self.policy_grad_clip),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(format!("{name} must be positive and finite, got {v}")));
            }
        }
        if self.target_entropy.is_some_and(|t| !t.is_finite()) {
            return Err(bad("target_entropy must be finite"));
        }
        if self.hidden.is_empty() || self.hidden.len() > MAX_LAYERS {
            return Err(bad(format!("hidden must list 1 to {MAX_LAYERS} widths, got {}", self.hidden.len())));
        }
        for &h in &self.hidden {
            in_range("hidden", h, 1, MAX_WIDTH)?;
        }
        let [e0, e1, l0, l1] = self.rollout_schedule.0;
        if e1 < e0 {
            return Err(bad(format!("rollout_schedule: max_epoch {e1} is before min_epoch {e0}")));
        }
        in_range("rollout_schedule max_epoch", e1, 0, steps)?;
        for l in [l0, l1] {
            in_range("rollout_schedule rollout length", l, 1, MAX_ROLLOUT_LENGTH)?;
        }
        in_range("jacobian_states", self.jacobian_states, 0, 100_000)?;
        in_range("jacobian_directions", self.jacobian_directions, 0, 1024)?;
        if self.jacobian_states > 0 && self.jacobian_directions == 0 {
            return Err(bad("jacobian_directions must be at least 1 when jacobian_states is not 0"));
        }
        if let Some(h) = self.double_params_hidden {
            in_range("double_params_hidden", h, 1, MAX_WIDTH)?;
        }
        if self.variant.spec().uses_model() {
            self.model.validate()?;
            if self.model.elites == 0 || self.model.elites > self.model.ensemble_size {
                return Err(bad(format!(
                    "model.elites must be in 1..={}, got {}",
                    self.model.ensemble_size, self.model.elites
                )));
            }
            // D_model's capacity at the longest rollout, without overflow.
            let pool = self
                .rollout_batch_size
                .checked_mul(self.epoch_length)
                .map(|r| r / self.model_train_freq)
                .and_then(|r| r.checked_mul(self.retain_epochs))
                .and_then(|r| r.checked_mul(l0.max(l1)));
            if !pool.is_some_and(|p| (1..=MAX_MODEL_POOL).contains(&p)) {
                return Err(bad(format!(
                    "D_model must hold 1 to {MAX_MODEL_POOL} rows: retain_epochs x rollout_batch_size x \
                     epoch_length / model_train_freq x the longest rollout_schedule length is {}",
                    pool.map_or("beyond any count".to_string(), |p| p.to_string())
                )));
            }
            // The first model training sees min_pool_size rows; it needs one
            // left for training beside the holdout (ddppo-models' split).
            let n = self.min_pool_size;
            let hold = ((n as f64 * self.model.holdout_ratio).round() as usize).clamp(1, self.model.max_holdout);
            if n < 2 || hold >= n {
                return Err(bad(format!(
                    "min_pool_size ({n}) leaves no rows to train the models on beside the {hold} held out \
                     (model.holdout_ratio {})",
                    self.model.holdout_ratio
                )));
            }
        }
        if self.variant.spec().gradient_loss {
            self.gradient.validate()?;
            // The first model training searches neighbours among min_pool_size rows.
            if self.gradient.neighbours >= self.min_pool_size {
                return Err(bad(format!(
                    "gradient.neighbours ({}) must be below min_pool_size ({}): the first model training \
                     searches neighbours among that many rows",
                    self.gradient.neighbours, self.min_pool_size
                )));
            }
        }
        Ok(())
    }
}

impl AgentConfig {
    /// The dotted keys (`model.lr`) whose values differ between two configs,
    /// sorted; empty when they are equal.
    pub fn differing_keys(&self, other: &AgentConfig) -> Result<Vec<String>> {
        fn table(c: &AgentConfig) -> Result<toml::Table> {
            toml::Table::try_from(c).map_err(|e| Error::Config(format!("cannot serialise the config: {e}")))
        }
        fn walk(prefix: &str, a: &toml::Table, b: &toml::Table, out: &mut Vec<String>) {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let name = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                match (a.get(k), b.get(k)) {
                    (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => walk(&name, x, y, out),
                    (x, y) if x != y => out.push(name),
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        walk("", &table(self)?, &table(other)?, &mut out);
        Ok(out)
    }
}
