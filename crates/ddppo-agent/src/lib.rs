//! SAC critic, back-prop-through-model policy update and training loop (ALGORITHM.md sections 1, 4, 5, 6).

pub mod error;
pub mod nn;
pub mod policy_update;
pub mod rollout;
pub mod sac;

pub use error::{Error, Result};
