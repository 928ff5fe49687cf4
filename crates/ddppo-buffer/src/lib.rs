//! Replay buffers and the k-d tree neighbour index for DDPPO's gradient loss
//! (ALGORITHM.md sections 1 and 3; paper section 4, the directional-derivative
//! loss of equation 9 needs, for each input `x_j = (s_j, a_j)`, its `n`
//! nearest neighbours `x_i` in the newest 10,000 transitions).
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
//! # Ok::<(), ddppo_buffer::Error>(())
//! ```

mod neighbours;

pub use neighbours::{
    MAX_TREE_WIDTH, NeighbourIndex, NeighbourOptions, brute_force_neighbours, exact_sq_dist,
};

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
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
