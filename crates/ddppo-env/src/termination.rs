//! Termination of model predictions, one table for all tasks (ALGORITHM.md
//! section 8; the MBPO "static functions" the reference uses).
//!
//! These act on a predicted next observation, not on the simulator state, so
//! they differ slightly from the envs' own v2 checks (e.g. Hopper's bound
//! on `|s[1:]|` sees the clipped velocities). They need no simulator.
use crate::task::Task;

/// Whether a predicted next observation `next_obs` (one row) ends the episode.
///
/// A row shorter than the checks need counts as terminal, like a non-finite one.
pub fn is_terminal(task: Task, next_obs: &[f32]) -> bool {
    let s = next_obs;
    let finite = || s.iter().all(|x| x.is_finite());
    let healthy = match task {
        // finite && all |s[1:]| < 100 && s[0] > 0.7 && |s[1]| < 0.2
        Task::Hopper => {
            s.len() >= 2 && finite() && s[1..].iter().all(|x| x.abs() < 100.0) && s[0] > 0.7 && s[1].abs() < 0.2
        }
        // 0.8 < s[0] < 2.0 && -1 < s[1] < 1 (a NaN fails every comparison)
        Task::Walker2d => s.len() >= 2 && s[0] > 0.8 && s[0] < 2.0 && s[1] > -1.0 && s[1] < 1.0,
        // finite && 0.2 <= s[0] <= 1.0
        Task::Ant => !s.is_empty() && finite() && s[0] >= 0.2 && s[0] <= 1.0,
        // 1.0 <= s[0] <= 2.0
        Task::Humanoid => !s.is_empty() && s[0] >= 1.0 && s[0] <= 2.0,
        // finite && |s[1]| <= 0.2
        Task::InvertedPendulum => s.len() >= 2 && finite() && s[1].abs() <= 0.2,
        Task::HalfCheetah | Task::Pendulum | Task::Linear => true,
    };
    !healthy
}
