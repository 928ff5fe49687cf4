//! The run state: every value of a run that is neither a network, a buffer
//! nor the simulator, in one serialisable struct. A checkpoint stores it
//! whole (`state.json`), so a field added here is saved and restored with no
//! other edit; leaving one out of it would make a resumed run differ, which
//! `crates/ddppo-cli/tests/checkpoint_identity.rs` catches.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Counters, random streams, the episode in progress and the metric
/// accumulators of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunState {
    /// Env steps taken.
    pub env_steps: usize,
    /// Critic updates taken.
    pub critic_updates: u64,
    /// Policy updates taken.
    pub policy_updates: u64,
    /// Model trainings taken.
    pub model_trainings: u64,
    /// Training episodes ended by a diverged simulation.
    pub diverged_episodes: u64,
    /// The env step is taken but the updates after it are not (a model
    /// training was interrupted): the next `Agent::step` finishes it.
    pub mid_step: bool,
    /// The current model-rollout length `k`.
    pub rollout_length: usize,
    /// The training env's current observation.
    pub obs: Vec<f64>,
    /// Return of the training episode in progress.
    pub episode_return: f64,
    /// Return of the last finished training episode.
    pub last_train_return: Option<f64>,
    /// Critic losses since the previous evaluation.
    pub critic_loss: Mean,
    /// Policy losses since the previous evaluation.
    pub policy_loss: Mean,
    /// Figures of the last model training.
    pub model_stats: ModelStats,
    /// Epochs run by the model trainings since the previous evaluation: the
    /// rollout ensemble's, the gradient ensemble's. (Absent from checkpoints
    /// written before it existed: read as none.)
    #[serde(default)]
    pub model_epochs: [u64; 2],
    /// The four random streams.
    pub rngs: AgentRngs,
}

impl RunState {
    /// The state of a run before its first step, with observation `obs`.
    pub(crate) fn new(rngs: AgentRngs, obs: Vec<f64>, rollout_length: usize) -> Self {
        Self {
            env_steps: 0,
            critic_updates: 0,
            policy_updates: 0,
            model_trainings: 0,
            diverged_episodes: 0,
            mid_step: false,
            rollout_length,
            obs,
            episode_return: 0.0,
            last_train_return: None,
            critic_loss: Mean::default(),
            policy_loss: Mean::default(),
            model_stats: ModelStats::default(),
            model_epochs: [0; 2],
            rngs,
        }
    }
}

/// A running mean, emptied when read.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Mean {
    /// Sum of the values added since the last evaluation took the mean.
    pub sum: f64,
    /// Their number.
    pub n: usize,
}

impl Mean {
    pub(crate) fn add(&mut self, v: f64) {
        self.sum += v;
        self.n += 1;
    }
    pub(crate) fn take(&mut self) -> Option<f64> {
        let m = (self.n > 0).then(|| self.sum / self.n as f64);
        *self = Mean::default();
        m
    }
}

/// What the last model training reported (repeated in every evaluation record
/// until the next training).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ModelStats {
    /// Mean training loss of the rollout ensemble.
    pub loss: Option<f64>,
    /// Mean elite holdout MSE of the rollout ensemble.
    pub holdout: Option<f64>,
    /// The directional-derivative loss `R` of the gradient model.
    pub grad: Option<f64>,
}

/// The run's random streams, each a seekable `ChaCha8Rng`, serialised as
/// seed, stream and word position.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentRngs {
    /// Env reset seeds.
    #[serde(with = "stream")]
    pub env: ChaCha8Rng,
    /// Exploration noise and warm-up actions.
    #[serde(with = "stream")]
    pub act: ChaCha8Rng,
    /// Critic, policy and temperature updates.
    #[serde(with = "stream")]
    pub update: ChaCha8Rng,
    /// Model training and critic-data rollouts.
    #[serde(with = "stream")]
    pub model: ChaCha8Rng,
}

impl AgentRngs {
    /// Streams 1-4 of `seed` (stream 0 initialises the networks, 5 draws the
    /// Jacobian probe).
    pub(crate) fn new(seed: u64) -> Self {
        let stream = |k: u64| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            r.set_stream(k);
            r
        };
        Self { env: stream(1), act: stream(2), update: stream(3), model: stream(4) }
    }
}

/// A `ChaCha8Rng` as `{seed: 64 hex digits, stream, word_pos}`; the word
/// position (a `u128`) is a decimal string, which JSON numbers cannot hold.
mod stream {
    use rand_chacha::ChaCha8Rng;
    use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error};

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Position {
        seed: String,
        stream: u64,
        word_pos: String,
    }

    pub fn serialize<S: Serializer>(r: &ChaCha8Rng, s: S) -> Result<S::Ok, S::Error> {
        let seed = r.get_seed().iter().map(|b| format!("{b:02x}")).collect();
        Position { seed, stream: r.get_stream(), word_pos: r.get_word_pos().to_string() }.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ChaCha8Rng, D::Error> {
        let p = Position::deserialize(d)?;
        let hex = p.seed.as_bytes();
        if hex.len() != 64 {
            return Err(D::Error::custom(format!("random-stream seed `{}` is not 64 hex digits", p.seed)));
        }
        let mut seed = [0u8; 32];
        for (b, pair) in seed.iter_mut().zip(hex.chunks(2)) {
            let digits = std::str::from_utf8(pair).map_err(D::Error::custom)?;
            *b = u8::from_str_radix(digits, 16).map_err(|e| D::Error::custom(format!("random-stream seed: {e}")))?;
        }
        let pos: u128 = p.word_pos.parse().map_err(|e| D::Error::custom(format!("random-stream position: {e}")))?;
        let mut r = <ChaCha8Rng as rand::SeedableRng>::from_seed(seed);
        r.set_stream(p.stream);
        r.set_word_pos(pos);
        Ok(r)
    }
}
