//! Stepping a learned model: "pick a member, sample, terminate" in one place
//! ([`ModelRollout`]), used by both the critic's data generation (ALGORITHM.md
//! section 1 step 3) and the policy update (section 4).
//!
//! The models sit behind the small [`DynamicsModel`] trait so that tests can
//! plug in exact dynamics; `ddppo-models`' ensembles implement it.

use candle_core::{DType, Tensor};
use rand_chacha::ChaCha8Rng;

use crate::Result;

/// `(r, s')` for a batch of rows.
#[derive(Clone, Debug)]
pub struct Prediction {
    /// rows
    pub reward: Tensor,
    /// rows x obs_dim
    pub next_obs: Tensor,
}

/// A (possibly stochastic, possibly ensemble) model of `(r, s') | (s, a)`.
pub trait DynamicsModel {
    /// Which member predicts each of `rows` rows (an ensemble draws one elite
    /// per row; a single model returns zeros).
    fn draw_members(&self, rows: usize, rng: &mut ChaCha8Rng) -> Vec<usize>;
    /// A draw from the predictive distribution of the given members: the
    /// value a rollout uses. The caller does not differentiate through it.
    fn sample(&self, obs: &Tensor, act: &Tensor, members: &[usize], rng: &mut ChaCha8Rng) -> Result<Prediction>;
    /// The members' mean prediction, differentiable in `obs` and `act`: the
    /// derivative path of the policy update.
    fn mean(&self, obs: &Tensor, act: &Tensor, members: &[usize]) -> Result<Prediction>;
}

/// The outcome of one model step.
#[derive(Clone, Debug)]
pub struct RolloutStep {
    /// rows; value of the prediction sample, derivative of the gradient model.
    pub reward: Tensor,
    /// rows x obs_dim; likewise.
    pub next_obs: Tensor,
    /// Termination function on each row of `next_obs` (host side, no gradient).
    pub done: Vec<bool>,
    /// Members of the gradient model used per row (empty without one).
    pub gradient_members: Vec<usize>,
}

/// Termination function on one row of predicted next observation.
pub type Termination<'a> = &'a (dyn Fn(&[f32]) -> bool + Sync);

/// Rolls a learned model: the prediction model gives the values, the optional
/// gradient model the derivatives, the task's termination function the dones.
pub struct ModelRollout<'a> {
    /// Supplies the values (sampled).
    pub prediction: &'a dyn DynamicsModel,
    /// Supplies `d(r, s')/d(s, a)` when the caller differentiates; `None`
    /// returns the detached sample.
    pub gradient: Option<&'a dyn DynamicsModel>,
    /// The gradient model is the prediction model itself: differentiate the
    /// same member that produced the value instead of drawing another.
    pub share_members: bool,
    /// `is_terminal` of the task.
    pub terminal: Termination<'a>,
}

impl<'a> ModelRollout<'a> {
    /// One step from `(obs, act)`. With a gradient model the outputs are
    /// `sg(p) + g - sg(g)` (section 4): the prediction sample's value and the
    /// gradient model mean's derivative, in a single backward pass.
    pub fn step(&self, obs: &Tensor, act: &Tensor, rng: &mut ChaCha8Rng) -> Result<RolloutStep> {
        let rows = obs.dim(0)?;
        let members = self.prediction.draw_members(rows, rng);
        let p = self.prediction.sample(obs, act, &members, rng)?;
        let p_rew = p.reward.detach();
        let p_next = p.next_obs.detach();
        let done = self.terminations(&p_next)?;
        let (reward, next_obs, gradient_members) = match self.gradient {
            Some(gm) => {
                let gmembers = if self.share_members { members.clone() } else { gm.draw_members(rows, rng) };
                let g = gm.mean(obs, act, &gmembers)?;
                let reward = ((&p_rew + &g.reward)? - g.reward.detach())?;
                let next_obs = ((&p_next + &g.next_obs)? - g.next_obs.detach())?;
                (reward, next_obs, gmembers)
            }
            None => (p_rew, p_next, Vec::new()),
        };
        Ok(RolloutStep { reward, next_obs, done, gradient_members })
    }

    /// The termination function on every row of `next_obs`.
    pub fn terminations(&self, next_obs: &Tensor) -> Result<Vec<bool>> {
        let (rows, dim) = next_obs.dims2()?;
        let flat = next_obs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok((0..rows).map(|i| (self.terminal)(&flat[i * dim..(i + 1) * dim])).collect())
    }
}

/// The ensembles of `ddppo-models`: one elite per row, sampled or mean.
impl DynamicsModel for ddppo_models::ProbabilisticEnsemble {
    fn draw_members(&self, rows: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
        self.draw_elites(rows, rng)
    }
    fn sample(&self, obs: &Tensor, act: &Tensor, members: &[usize], rng: &mut ChaCha8Rng) -> Result<Prediction> {
        let (sample, _) = ddppo_models::ProbabilisticEnsemble::sample(self, obs, act, members, rng)?;
        Ok(Prediction { reward: sample.reward, next_obs: sample.next_obs })
    }
    fn mean(&self, obs: &Tensor, act: &Tensor, members: &[usize]) -> Result<Prediction> {
        let m = ddppo_models::ProbabilisticEnsemble::mean(self, obs, act, members)?;
        Ok(Prediction { reward: m.reward, next_obs: m.next_obs })
    }
}
