//! Replay buffers and the neighbour index of DDPPO's gradient loss
//! (paper section 4.3 and Algorithm 1; ALGORITHM.md sections 1, 3 and 5).
//!
//! - [`ReplayBuffer`]: `D_env` and `D_model`, a fixed-capacity ring of
//!   `(s, a, r, s', mask, done)` in `f32` columns; seeded sampling into a
//!   caller-owned [`Batch`], [`sample_mixed`] for the critic's
//!   `real_ratio` mix, [`ReplayBuffer::resize`] for `D_model`, and a
//!   checksummed file format ([`storage`]) for checkpoints.
//! - [`NeighbourIndex`]: for each input `x = (s, a)` of the newest 10,000
//!   transitions, its `n` nearest other inputs, the `x_i` of the gradient
//!   loss R (equation 9). Exact (identical to [`brute_force_neighbours`],
//!   ties by the smaller index) by either of two searches, chosen per data
//!   set from its [`effective_dimension`] ([`NeighbourMethod::Auto`]): a
//!   PCA-rotated kiddo k-d tree for locally low-dimensional points (smooth
//!   trajectories), or a blocked f32 GEMM (`gemm` crate) for points that fill
//!   many dimensions (replay data with uniform random actions). Both re-rank
//!   candidates in f64 and certify each row against a rigorous rounding
//!   bound, recomputing uncertified rows by brute force.
//!
//! ```
//! use ddppo_buffer::{NeighbourIndex, NeighbourOptions};
//!
//! // Five points on a line in 2-D, x = (t, 0).
//! let points: Vec<f32> = [0.0, 1.0, 3.0, 6.0, 10.0].iter().flat_map(|&t| [t, 0.0]).collect();
//! let index = NeighbourIndex::build(&points, 2, 2, &NeighbourOptions::default())?;
//! assert_eq!(index.len(), 5);
//! assert_eq!(index.neighbours(0), &[1, 2]); // distances 1, 9
//! assert_eq!(index.neighbours(3), &[2, 4]); // distances 9, 16 (the point itself excluded)
//!
//! // D_env: push transitions, sample a batch into caller-owned storage.
//! use ddppo_buffer::{Batch, ReplayBuffer};
//! use rand::SeedableRng;
//! let mut d_env = ReplayBuffer::new(2, 1, 1000);
//! d_env.push(&[0.0, 1.0], &[0.5], 1.0, &[0.1, 1.0], 1.0, 0.0)?;
//! d_env.push(&[0.1, 1.0], &[-0.5], 0.5, &[0.2, 0.9], 0.0, 1.0)?;
//! let mut batch = Batch::new(4, 2, 1);
//! d_env.sample_into(&mut rand_chacha::ChaCha8Rng::seed_from_u64(0), &mut batch);
//! assert!(batch.rew.iter().all(|&r| r == 1.0 || r == 0.5));
//! assert_eq!(d_env.newest(1).rew, vec![0.5]);
//! # Ok::<(), ddppo_buffer::Error>(())
//! ```

mod distance;
mod gemm_search;
mod neighbours;
mod replay;
pub mod storage;

pub use distance::exact_sq_dist;
pub use neighbours::{
    LID_SAMPLES, MAX_TREE_WIDTH, NeighbourIndex, NeighbourMethod, NeighbourOptions, TREE_MAX_EFFECTIVE_DIM,
    brute_force_neighbours, effective_dimension,
};
pub use replay::{Batch, Columns, ReplayBuffer, sample_mixed, try_sample_mixed};
pub use storage::Fnv1a;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Points or rows of width zero.
    #[error("point dimension must be at least 1")]
    ZeroDim,
    /// A flat point array whose length is not a multiple of the width.
    #[error("{len} coordinates do not split into rows of width {dim}")]
    RaggedPoints { len: usize, dim: usize },
    /// `n = 0` neighbours asked for.
    #[error("the number of neighbours n must be at least 1")]
    ZeroNeighbours,
    /// `n >= N`: a point has only `N - 1` others.
    #[error("n = {n} neighbours need at least n + 1 = {} points, got {points}", n + 1)]
    TooFewPoints { n: usize, points: usize },
    /// Neighbour ids are `u32`.
    #[error("{points} points exceed the u32 index range of the neighbour table")]
    TooManyPoints { points: usize },
    /// NaN or infinity in a point (a k-d tree would silently return nothing).
    #[error("point {row} has a non-finite coordinate {value} in column {col}")]
    NonFinitePoint { row: usize, col: usize, value: f32 },
    /// A pushed column whose length is not `rows x width`.
    #[error("column {column}: expected {expected} values for {rows} rows, got {got}")]
    RowWidth { column: &'static str, expected: usize, got: usize, rows: usize },
    /// NaN or infinity in a pushed transition (the models must never see one).
    #[error("column {column}, row {row}: non-finite value {value}")]
    NonFiniteValue { column: &'static str, row: usize, value: f32 },
    /// A push into a buffer of capacity 0.
    #[error("cannot push into a replay buffer of capacity 0")]
    ZeroCapacity,
    /// Sampling from a buffer with no rows.
    #[error("cannot sample from an empty replay buffer")]
    EmptyBuffer,
    /// `real_ratio` outside [0, 1].
    #[error("real_ratio must lie in [0, 1], got {0}")]
    RealRatio(f64),
    /// Mixed sampling from buffers of different (obs, act) widths.
    #[error("env buffer has (obs, act) widths {env:?}, model buffer {model:?}")]
    MixedWidths { env: (usize, usize), model: (usize, usize) },
    /// A file system error while saving or loading.
    #[error("{}: {source}", path.display())]
    Io { path: std::path::PathBuf, source: std::io::Error },
    /// A file that does not start with the replay-buffer magic bytes.
    #[error("{}: not a replay buffer file (wrong magic bytes)", path.display())]
    NotABuffer { path: std::path::PathBuf },
    /// A replay-buffer file of another format version.
    #[error("{}: replay buffer format version {found}, this build reads version {supported}", path.display())]
    UnsupportedVersion { path: std::path::PathBuf, found: u32, supported: u32 },
    /// A truncated, over-long or corrupted replay-buffer file.
    #[error("{}: corrupted replay buffer file: {reason}", path.display())]
    Corrupt { path: std::path::PathBuf, reason: String },
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
