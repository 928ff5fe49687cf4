//! The crate's error type.

/// Everything that can go wrong in `ddppo-agent`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, device error).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A configuration value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Config(String),
    /// A `--set KEY=VALUE` override is malformed (the message names it).
    #[error("{0}")]
    Override(String),
    /// A configuration file could not be parsed.
    #[error("cannot parse config {path}: {source}")]
    ConfigParse {
        /// The file (or `<string>`).
        path: String,
        /// The TOML error.
        #[source]
        source: toml::de::Error,
    },
    /// A configuration file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The gradient-error study ([`crate::grad_error`]) got an env it does not have.
    #[error("unknown study env `{0}`; valid names: pendulum, linear")]
    UnknownStudyEnv(String),
    /// A value of the gradient-error study's config is out of range.
    #[error("bad study config: {0}")]
    StudyConfig(String),
    /// Input with the wrong dimensions.
    #[error("dimension mismatch: {0}")]
    Shape(String),
    /// The environment crate reported an error.
    #[error("environment: {0}")]
    Env(#[from] ddppo_env::Error),
    /// The buffer crate reported an error.
    #[error("replay buffer: {0}")]
    Buffer(#[from] ddppo_buffer::Error),
    /// The models crate reported an error.
    #[error("model: {0}")]
    Model(#[from] ddppo_models::Error),
    /// A checkpoint is missing, incomplete, corrupt or of another run.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint directory or file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Training diverged (non-finite loss).
    #[error("training diverged: {0}")]
    Diverged(String),
    /// The interrupt flag ([`crate::Agent::set_interrupt`]) stopped a step;
    /// the agent can be checkpointed and the step finishes after a resume.
    #[error("interrupted")]
    Interrupted,
    /// The observer of [`crate::Agent::train`] stopped the run (its own
    /// error, shown as it is).
    #[error(transparent)]
    Observer(crate::agent::ObserverError),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
