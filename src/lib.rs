//! DDPPO in Rust: policy optimisation by back-propagating through a learned
//! model ("Gradient Information Matters in Policy Optimization by
//! Back-propagating through Model", ICLR 2022).
//!
//! This facade re-exports the workspace's crates so that one dependency
//! brings all of them:
//!
//! - [`env`]: MuJoCo tasks with MuJoCo-v2 semantics, analytic envs with exact Jacobians;
//! - [`buffer`]: replay buffers and the k-d tree neighbour index;
//! - [`models`]: the prediction and gradient ensembles;
//! - [`agent`]: SAC critic, the back-prop policy update and the training loop.
pub use ddppo_agent as agent;
pub use ddppo_buffer as buffer;
pub use ddppo_env as env;
pub use ddppo_models as models;
