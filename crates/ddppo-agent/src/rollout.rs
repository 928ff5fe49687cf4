//! The model env: a learned model stepped like an environment. [`ModelEnv`]
//! is the one place that picks an elite, samples and terminates, for the
//! critic's data (ALGORITHM.md section 1 step 3: [`ModelEnv::rollout_into`],
//! `k` steps into `D_model`) and for the policy update (section 4:
//! [`ModelEnv::draw`] and [`ModelEnv::imagine_step`], `H` steps with values
//! from the rollout model and derivatives from the gradient model).
//!
//! The models sit behind the small [`DynamicsModel`] trait so that tests can
//! plug in exact dynamics; `ddppo-models`' ensembles implement it.
//!
//! Host-device copies (all through `ddppo_models::transfer`, which counts
//! them): a policy update draws everything its `H` steps need first and
//! uploads it in blocks, and reads the predicted states back once for the
//! termination function, so its copies do not grow with `H`. The critic's
//! rollout pushes every step into the host buffer `D_model` and drops the
//! terminated rows, so it copies per step: the states, the policy noise, the
//! members, the model noise up, the actions, rewards and next states back.

use candle_core::{DType, Device, Tensor};
use ddppo_buffer::{Batch, ReplayBuffer};
use ddppo_env::{Task, is_terminal};
use ddppo_models::{MemberGroups, ProbabilisticEnsemble, transfer};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::agent::LearnedModels;
use crate::fused::join_threads;
use crate::nn::upload;
use crate::sac::GaussianPolicy;
use crate::variant::GradientSource;
use crate::{Error, Result};

/// Rows per chunk of the critic-data model rollout (bounds peak memory of a
/// 100 000-row rollout).
pub const ROLLOUT_CHUNK: usize = 25_000;

/// `(r, s')` for a batch of rows.
#[derive(Clone, Debug)]
pub struct Prediction {
    /// rows
    pub reward: Tensor,
    /// rows x obs_dim
    pub next_obs: Tensor,
}

/// The members drawn for the rows of one model step, with the grouping a
/// model prepared on its device ([`DynamicsModel::prepare`]).
#[derive(Clone, Debug)]
pub struct Members {
    /// The member of each row.
    pub rows: Vec<usize>,
    /// Rows grouped by member on the device (`None`: the model groups them
    /// when it needs to).
    pub groups: Option<MemberGroups>,
}

impl Members {
    /// Members without a prepared grouping.
    pub fn host(rows: Vec<usize>) -> Self {
        Self { rows, groups: None }
    }
}

/// A (possibly stochastic, possibly ensemble) model of `(r, s') | (s, a)`.
pub trait DynamicsModel: Sync {
    /// Which member predicts each of `rows` rows (an ensemble draws one elite
    /// per row; a single model returns zeros).
    fn draw_members(&self, rows: usize, rng: &mut ChaCha8Rng) -> Vec<usize>;
    /// Standard-normal draws per row that [`DynamicsModel::sample`] needs (0
    /// for a deterministic model); they are drawn right after the members.
    fn noise_width(&self) -> usize;
    /// Readies the members of several steps for [`DynamicsModel::sample`] and
    /// [`DynamicsModel::mean`] (an ensemble groups the rows by member on its
    /// device, in one upload for all steps).
    fn prepare(&self, steps: Vec<Vec<usize>>) -> Result<Vec<Members>> {
        Ok(steps.into_iter().map(Members::host).collect())
    }
    /// A draw from the predictive distribution of the given members for the
    /// standard-normal `noise` (rows x [`noise_width`](DynamicsModel::noise_width),
    /// `None` when that is 0): the value a rollout uses. The caller does not
    /// differentiate through it.
    fn sample(&self, obs: &Tensor, act: &Tensor, members: &Members, noise: Option<&Tensor>) -> Result<Prediction>;
    /// The members' mean prediction, differentiable in `obs` and `act`: the
    /// derivative path of the policy update.
    fn mean(&self, obs: &Tensor, act: &Tensor, members: &Members) -> Result<Prediction>;
    /// Multiply-adds of one row's forward pass: whether a pass is worth a
    /// helper thread (`ddppo_models::split::join`). 0, the default: never.
    fn work_per_row(&self) -> usize {
        0
    }
}

impl<T: DynamicsModel + ?Sized> DynamicsModel for &T {
    fn draw_members(&self, rows: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
        (**self).draw_members(rows, rng)
    }
    fn noise_width(&self) -> usize {
        (**self).noise_width()
    }
    fn prepare(&self, steps: Vec<Vec<usize>>) -> Result<Vec<Members>> {
        (**self).prepare(steps)
    }
    fn sample(&self, obs: &Tensor, act: &Tensor, members: &Members, noise: Option<&Tensor>) -> Result<Prediction> {
        (**self).sample(obs, act, members, noise)
    }
    fn mean(&self, obs: &Tensor, act: &Tensor, members: &Members) -> Result<Prediction> {
        (**self).mean(obs, act, members)
    }
    fn work_per_row(&self) -> usize {
        (**self).work_per_row()
    }
}

/// Termination function on one row of predicted next observation.
pub type Termination<'a> = Box<dyn Fn(&[f32]) -> bool + Sync + 'a>;

/// Where a model step's derivatives come from.
pub enum Derivatives<'a> {
    /// Nowhere: the env gives values only (the critic's data of `mbpo`).
    None,
    /// The rollout model's mean at the member that produced the value.
    RolloutMean,
    /// A separate model's mean at members drawn for it.
    Separate(Box<dyn DynamicsModel + 'a>),
}

/// One model step of the policy update.
#[derive(Clone, Debug)]
pub struct ImaginedStep {
    /// rows; the rollout model's sampled value, the derivative of the
    /// gradient model: `sg(p) + g - sg(g)` (section 4).
    pub reward: Tensor,
    /// rows x obs_dim; likewise.
    pub next_obs: Tensor,
    /// The sampled next state alone (detached), for the termination function.
    pub sampled_next_obs: Tensor,
}

/// Everything the `H` steps of one policy update draw, drawn in the order the
/// steps would draw it one at a time (per step: policy noise, the rollout
/// model's members, its noise, the gradient model's members; then the policy
/// noise of `s_H`), and uploaded in blocks.
pub struct ImaginationDraws {
    /// `(H + 1) x rows x act_dim`.
    policy_noise: Tensor,
    /// `H x rows x noise_width`, without noise for a deterministic model.
    model_noise: Option<Tensor>,
    /// The rollout model's members per step.
    members: Vec<Members>,
    /// The gradient model's members per step (the rollout model's when shared).
    gradient_members: Vec<Members>,
}

impl ImaginationDraws {
    /// Standard-normal policy noise of `a_t`, rows x act_dim (`t = 0 ..= H`).
    pub fn policy_noise(&self, t: usize) -> Result<Tensor> {
        Ok(self.policy_noise.get(t)?)
    }
    /// The gradient model's members at step `t`.
    pub fn gradient_members(&self, t: usize) -> &[usize] {
        &self.gradient_members[t].rows
    }
}

/// A learned model stepped as an environment: values from the rollout model,
/// derivatives as [`Derivatives`] says, dones from the task's termination
/// function.
pub struct ModelEnv<'a> {
    prediction: Box<dyn DynamicsModel + 'a>,
    derivatives: Derivatives<'a>,
    terminal: Termination<'a>,
}

impl<'a> ModelEnv<'a> {
    /// The env of a rollout model, a source of derivatives and a termination function.
    pub fn new(
        prediction: Box<dyn DynamicsModel + 'a>,
        derivatives: Derivatives<'a>,
        terminal: Termination<'a>,
    ) -> Self {
        Self { prediction, derivatives, terminal }
    }

    /// The model env of a run's learned models as the variant table says
    /// ([`GradientSource`]), on frozen views of the ensembles (the policy
    /// update's backward pass forms gradients for the policy only).
    pub fn of_models(models: &LearnedModels, source: GradientSource, task: Task) -> Result<ModelEnv<'static>> {
        let prediction = Box::new(models.prediction.ensemble().frozen());
        let derivatives = match source {
            GradientSource::SeparateEnsemble => {
                let g = models.gradient.as_ref().ok_or_else(|| Error::Config("no gradient ensemble".into()))?;
                Derivatives::Separate(Box::new(g.ensemble().frozen()))
            }
            GradientSource::RolloutMean => Derivatives::RolloutMean,
            GradientSource::None => Derivatives::None,
        };
        Ok(ModelEnv::new(prediction, derivatives, Box::new(move |s: &[f32]| is_terminal(task, s))))
    }

    /// The termination function on every row of `next_obs` (rows x obs_dim).
    pub fn terminations(&self, next_obs: &Tensor) -> Result<Vec<bool>> {
        let (_, dim) = next_obs.dims2()?;
        let flat = transfer::download_f32(next_obs)?;
        Ok(self.terminal_rows(&flat, dim))
    }

    fn terminal_rows(&self, flat: &[f32], dim: usize) -> Vec<bool> {
        flat.chunks(dim.max(1)).map(|row| (self.terminal)(row)).collect()
    }

    /// The termination function on the states of several steps (each rows x
    /// obs_dim), read back in one copy.
    pub fn terminations_of_steps(&self, states: &[Tensor]) -> Result<Vec<Vec<bool>>> {
        let Some(first) = states.first() else { return Ok(Vec::new()) };
        let (rows, dim) = first.dims2()?;
        if rows * dim == 0 {
            return Ok(vec![Vec::new(); states.len()]);
        }
        let flat = transfer::download_f32(&Tensor::stack(states, 0)?)?;
        Ok(flat.chunks(rows * dim).map(|step| self.terminal_rows(step, dim)).collect())
    }

    fn draw_noise(&self, rows: usize, rng: &mut ChaCha8Rng, into: &mut Vec<f64>) {
        let n = rows * self.prediction.noise_width();
        into.extend((0..n).map(|_| rng.sample::<f64, _>(rand_distr::StandardNormal)));
    }

    /// One step of values (the detached sample, no derivative) from `(obs, act)`,
    /// members and noise drawn from `rng` now.
    pub fn step_values(&self, obs: &Tensor, act: &Tensor, rng: &mut ChaCha8Rng) -> Result<Prediction> {
        let rows = obs.dim(0)?;
        let members = self.prediction.draw_members(rows, rng);
        let mut noise = Vec::new();
        self.draw_noise(rows, rng, &mut noise);
        let width = self.prediction.noise_width();
        let noise = match width {
            0 => None,
            _ => Some(transfer::upload_f64(noise, &[rows, width], obs.dtype(), obs.device())?),
        };
        let members = self.prediction.prepare(vec![members])?.pop().ok_or_else(|| no("members"))?;
        let p = self.prediction.sample(obs, act, &members, noise.as_ref())?;
        Ok(Prediction { reward: p.reward.detach(), next_obs: p.next_obs.detach() })
    }

    /// Section 1 step 3: `k`-step rollouts of the (stochastic) `policy` from
    /// `starts` states drawn from `start_from` (`D_env`), every step pushed
    /// into `pool` (`D_model`), terminated rows dropped from the next step.
    /// Draws from `rng` per chunk of [`ROLLOUT_CHUNK`] rows: the start states,
    /// then per step the policy noise, the members and the model noise.
    pub fn rollout_into(
        &self,
        policy: &GaussianPolicy,
        start_from: &ReplayBuffer,
        starts: usize,
        k: usize,
        rng: &mut ChaCha8Rng,
        pool: &mut ReplayBuffer,
    ) -> Result<()> {
        let (od, ad) = (start_from.obs_dim(), start_from.act_dim());
        let mut remaining = starts;
        while remaining > 0 {
            let rows = remaining.min(ROLLOUT_CHUNK);
            remaining -= rows;
            let mut start = Batch::new(rows, od, ad);
            start_from.try_sample_into(rng, &mut start)?;
            let mut obs = start.obs;
            let mut n = rows;
            for _ in 0..k {
                let s = upload(&obs, n, od, DType::F32, policy.device())?;
                let a = policy.sample(&s, rng)?.action.detach();
                let step = self.step_values(&s, &a, rng)?;
                let act = transfer::download_f32(&a)?;
                let rew = transfer::download_f32(&step.reward)?;
                let next = transfer::download_f32(&step.next_obs)?;
                if next.iter().any(|v| !v.is_finite()) || rew.iter().any(|v| !v.is_finite()) {
                    return Err(Error::Diverged("model rollout produced a non-finite state".into()));
                }
                let done = self.terminal_rows(&next, od);
                let mask: Vec<f32> = done.iter().map(|d| if *d { 0.0 } else { 1.0 }).collect();
                let done_f: Vec<f32> = done.iter().map(|d| if *d { 1.0 } else { 0.0 }).collect();
                pool.push_batch(&obs, &act, &rew, &next, &mask, &done_f)?;
                let alive: Vec<usize> = (0..n).filter(|&i| !done[i]).collect();
                if alive.is_empty() {
                    break;
                }
                obs = alive.iter().flat_map(|&i| next[i * od..(i + 1) * od].iter().copied()).collect();
                n = alive.len();
            }
        }
        Ok(())
    }

    /// Draws what `horizon` steps of a policy update from `rows` start states
    /// need (see [`ImaginationDraws`]) and uploads it in `dtype` to `device`:
    /// policy noise and model noise one block each, the members of each model
    /// in one upload.
    pub fn draw(
        &self,
        rows: usize,
        act_dim: usize,
        horizon: usize,
        dtype: DType,
        device: &Device,
        rng: &mut ChaCha8Rng,
    ) -> Result<ImaginationDraws> {
        let gradient = match &self.derivatives {
            Derivatives::None => return Err(Error::Config("the policy update needs model derivatives".into())),
            Derivatives::RolloutMean => None,
            Derivatives::Separate(g) => Some(g),
        };
        let normal = |rng: &mut ChaCha8Rng, n: usize, into: &mut Vec<f64>| {
            into.extend((0..n).map(|_| rng.sample::<f64, _>(rand_distr::StandardNormal)));
        };
        let mut policy_noise = Vec::with_capacity((horizon + 1) * rows * act_dim);
        let mut model_noise = Vec::new();
        let mut members = Vec::with_capacity(horizon);
        let mut gradient_members = Vec::with_capacity(horizon);
        for _ in 0..horizon {
            normal(rng, rows * act_dim, &mut policy_noise);
            members.push(self.prediction.draw_members(rows, rng));
            self.draw_noise(rows, rng, &mut model_noise);
            if let Some(g) = gradient {
                gradient_members.push(g.draw_members(rows, rng));
            }
        }
        normal(rng, rows * act_dim, &mut policy_noise);
        let policy_noise = transfer::upload_f64(policy_noise, &[horizon + 1, rows, act_dim], dtype, device)?;
        let width = self.prediction.noise_width();
        let model_noise = match width {
            0 => None,
            _ => Some(transfer::upload_f64(model_noise, &[horizon, rows, width], dtype, device)?),
        };
        let members = self.prediction.prepare(members)?;
        let gradient_members = match gradient {
            Some(g) => g.prepare(gradient_members)?,
            None => members.clone(),
        };
        Ok(ImaginationDraws { policy_noise, model_noise, members, gradient_members })
    }

    /// Step `t` of a policy update from `(obs, act)` with the draws of
    /// [`ModelEnv::draw`]: the outputs are `sg(p) + g - sg(g)` (section 4),
    /// the rollout model sample's value and the gradient model mean's
    /// derivative, in a single backward pass. Makes no host-device copy.
    pub fn imagine_step(&self, obs: &Tensor, act: &Tensor, draws: &ImaginationDraws, t: usize) -> Result<ImaginedStep> {
        let noise = draws.model_noise.as_ref().map(|n| n.get(t)).transpose()?;
        // The two models' passes are independent: the value's on a helper
        // thread (on detached inputs: it is cut from the graph anyway) while
        // this thread forms the derivative's graph.
        let (obs_value, act_value) = (obs.detach(), act.detach());
        let work = obs.dim(0)? * self.prediction.work_per_row();
        let (g, p) = ddppo_models::split::join(
            join_threads(obs, work),
            || match &self.derivatives {
                Derivatives::None => Err(Error::Config("the policy update needs model derivatives".into())),
                Derivatives::RolloutMean => self.prediction.mean(obs, act, &draws.gradient_members[t]),
                Derivatives::Separate(gm) => gm.mean(obs, act, &draws.gradient_members[t]),
            },
            || self.prediction.sample(&obs_value, &act_value, &draws.members[t], noise.as_ref()),
        );
        let (g, p) = (g?, p?);
        let p_rew = p.reward.detach();
        let p_next = p.next_obs.detach();
        let reward = ((&p_rew + &g.reward)? - g.reward.detach())?;
        let next_obs = ((&p_next + &g.next_obs)? - g.next_obs.detach())?;
        Ok(ImaginedStep { reward, next_obs, sampled_next_obs: p_next })
    }
}

fn no(what: &str) -> Error {
    Error::Config(format!("internal: no {what}"))
}

/// The ensembles of `ddppo-models`: one elite per row, sampled or mean.
impl DynamicsModel for ProbabilisticEnsemble {
    fn draw_members(&self, rows: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
        self.draw_elites(rows, rng)
    }
    fn noise_width(&self) -> usize {
        1 + self.obs_dim()
    }
    fn work_per_row(&self) -> usize {
        let c = self.config();
        let (inp, out) = (self.obs_dim() + self.act_dim(), 2 * (1 + self.obs_dim()));
        inp * c.hidden + c.hidden_layers.saturating_sub(1) * c.hidden * c.hidden + c.hidden * out
    }
    fn prepare(&self, steps: Vec<Vec<usize>>) -> Result<Vec<Members>> {
        let views: Vec<&[usize]> = steps.iter().map(Vec::as_slice).collect();
        let groups = self.group_members(&views)?;
        Ok(steps.into_iter().zip(groups).map(|(rows, g)| Members { rows, groups: Some(g) }).collect())
    }
    fn sample(&self, obs: &Tensor, act: &Tensor, members: &Members, noise: Option<&Tensor>) -> Result<Prediction> {
        let noise = noise.ok_or_else(|| no("model noise"))?;
        let m = match &members.groups {
            Some(g) => self.sample_grouped(obs, act, g, noise)?,
            None => {
                let g = self.group_members(&[&members.rows])?.pop().ok_or_else(|| no("member groups"))?;
                self.sample_grouped(obs, act, &g, noise)?
            }
        };
        Ok(Prediction { reward: m.reward, next_obs: m.next_obs })
    }
    fn mean(&self, obs: &Tensor, act: &Tensor, members: &Members) -> Result<Prediction> {
        let m = match &members.groups {
            Some(g) => self.mean_grouped(obs, act, g)?,
            None => ProbabilisticEnsemble::mean(self, obs, act, &members.rows)?,
        };
        Ok(Prediction { reward: m.reward, next_obs: m.next_obs })
    }
}
