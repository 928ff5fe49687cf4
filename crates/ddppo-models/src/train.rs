//! Training of an ensemble: MBPO's schedule (ALGORITHM.md section 2), with the
//! directional-derivative loss of the gradient model optional (section 3,
//! equations 9 and 10). A training call (`train_ensemble`) runs four named
//! steps: the holdout split and scaler (`SplitData::new`), the neighbour set of
//! the directional-derivative loss (`NeighbourSet::new`), epochs (`run_epoch`),
//! and MBPO's early stopping (`EarlyStopping`).
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand::seq::SliceRandom;
use rand::seq::index;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::adam::{ModelOptimizer, OptimizerState};
use crate::ensemble::{EnsembleSnapshot, ProbabilisticEnsemble};
use crate::fused::Tape;
use crate::layer::host_tensor;
use crate::{EnsembleConfig, Error, GradientLossConfig, Result};

/// Training data, rows in time order (oldest first), row-major f32 columns.
#[derive(Clone, Copy, Debug)]
pub struct TransitionData<'a> {
    pub obs: &'a [f32],
    pub act: &'a [f32],
    pub rew: &'a [f32],
    pub next_obs: &'a [f32],
}

impl TransitionData<'_> {
    /// Number of rows, after checking that the columns agree and are finite.
    pub fn rows(&self, obs_dim: usize, act_dim: usize) -> Result<usize> {
        let n = self.rew.len();
        if self.obs.len() != n * obs_dim || self.next_obs.len() != n * obs_dim || self.act.len() != n * act_dim {
            return Err(Error::Data(format!(
                "columns disagree: {n} rewards, {} obs, {} act, {} next_obs values for obs_dim {obs_dim}, act_dim {act_dim}",
                self.obs.len(),
                self.act.len(),
                self.next_obs.len()
            )));
        }
        let all = [self.obs, self.act, self.rew, self.next_obs];
        if all.iter().any(|c| c.iter().any(|v| !v.is_finite())) {
            return Err(Error::Data("training data holds a non-finite value".into()));
        }
        Ok(n)
    }
}

/// What one training call did.
#[derive(Clone, Debug)]
pub struct TrainReport {
    pub epochs: usize,
    /// Best holdout MSE per member (the restored weights').
    pub holdout_mse: Vec<f64>,
    /// Mean total loss over the minibatches of the last epoch.
    pub train_loss: f64,
    /// Mean `R` (equation 9) over the minibatches of the last epoch; `None`
    /// without the directional-derivative loss.
    pub derivative_loss: Option<f64>,
}

/// Passed to the per-epoch observer.
#[derive(Clone, Debug)]
pub struct EpochStats {
    /// 1-based.
    pub epoch: usize,
    /// Holdout MSE of `(r, ds)` per member, current weights.
    pub holdout_mse: Vec<f64>,
    pub train_loss: f64,
    /// Mean `R` over the epoch's minibatches (with the directional-derivative loss).
    pub derivative_loss: Option<f64>,
}

/// One minibatch for the loss, in standardised inputs (host-built, member-major).
///
/// `x`: `E x B x in`, `y`: `E x B x out` targets `(r, ds)`; with the
/// directional-derivative loss also the [`NeighbourBatch`].
pub struct LossBatch {
    pub x: Tensor,
    pub y: Tensor,
    pub neighbours: Option<NeighbourBatch>,
}

/// The directional-derivative loss's part of a minibatch (equation 9).
///
/// `points`: `E x Bg x in` points `x_j`; `directions`: `E x (Bg * k) x in` the
/// standardised directions `v_ij = x_i - x_j` to `k` of their neighbours (row-major:
/// point, then neighbour); `differences`: `E x (Bg * k) x out` the differences
/// `y_i - y_j` (the `s` part of `s'` cancels against the identity in `g = s + ds`,
/// so the `ds` difference is the target for `J_ds · v`).
pub struct NeighbourBatch {
    pub points: Tensor,
    pub directions: Tensor,
    pub differences: Tensor,
    /// Directions per point: all `n` neighbours, or the `m` drawn for this minibatch.
    pub k: usize,
}

/// The loss terms of one minibatch.
pub struct LossTerms {
    /// Everything: `sum_e NLL_e + w R + penalty + decay` (equation 10 as a loss).
    pub total: Tensor,
    /// `E`: Gaussian NLL per member.
    pub nll: Tensor,
    /// `E`: `R` per member (mean over points, neighbours and dims).
    pub derivative_loss: Option<Tensor>,
}

/// The directional-derivative loss of equations 9 and 10.
pub struct DirectionalDerivativeLoss {
    /// Equation 9 per member (`E`): `R = mean (J_g(x_j) v_ij - (y_i - y_j))^2` over
    /// points, neighbours and output dims.
    pub per_member: Tensor,
    /// Equation 10's term `w R`, `R` averaged over the members (a scalar).
    pub weighted: Tensor,
}

/// Equations 9 and 10 from the model's directional derivatives `tangent`
/// (`J_g(x_j) v_ij`, `E x (Bg * k) x out`), the targets `differences`
/// (`y_i - y_j`, same shape) and the weight `w`.
///
/// With `m` of the `n` neighbours of each point drawn uniformly without
/// replacement (`gradient.directions_per_step`), the mean over the drawn ones
/// is an unbiased estimate of the mean over all `n`: each neighbour is drawn
/// with probability `m / n` and counted with weight `1 / m`.
pub fn directional_derivative_loss(
    tangent: &Tensor,
    differences: &Tensor,
    weight: f64,
) -> Result<DirectionalDerivativeLoss> {
    let per_member = (tangent - differences)?.sqr()?.mean((1, 2))?;
    let weighted = (per_member.mean_all()? * weight)?;
    Ok(DirectionalDerivativeLoss { per_member, weighted })
}

impl ProbabilisticEnsemble {
    /// The training loss on one minibatch; `weight` is `w` of equation 10.
    pub fn loss(&self, batch: &LossBatch, weight: f64) -> Result<LossTerms> {
        Ok(self.training_loss(batch, weight, false)?.0)
    }

    /// [`loss`](Self::loss); with `taped` on the fused CPU path the hidden stack
    /// runs outside the graph, and the [`Tape`] that comes back must be given to
    /// [`ModelOptimizer::backward_step_taped`](crate::ModelOptimizer) with the
    /// total (the same gradients, without candle's zero-filled buffer and
    /// addition per activation). The tape also holds the weight decay's
    /// gradient; the total keeps its value.
    pub(crate) fn training_loss(
        &self,
        batch: &LossBatch,
        weight: f64,
        taped: bool,
    ) -> Result<(LossTerms, Option<Tape>)> {
        let b = batch.x.dim(1)?;
        let mut out = match &batch.neighbours {
            Some(nb) => {
                self.forward_jv_with(&Tensor::cat(&[&batch.x, &nb.points], 1)?, b, &nb.directions, nb.k, taped)?
            }
            None => self.forward_std_with(&batch.x, None, None, taped)?,
        };
        let mut tape = out.tape.take();
        let mean = out.mean.narrow(1, 0, b)?;
        let lv = out.logvar.narrow(1, 0, b)?;
        // Gaussian NLL per member: mean((mu - y)^2 exp(-lv)) + mean(lv).
        let nll = ((mean - &batch.y)?.sqr()? * lv.neg()?.exp()?)?.add(&lv)?.mean((1, 2))?;
        let mut total = nll.sum_all()?;
        let mut derivative_loss = None;
        if let (Some(nb), Some(tangent)) = (&batch.neighbours, out.tangent) {
            let term = directional_derivative_loss(&tangent, &nb.differences, weight)?;
            total = (total + term.weighted)?;
            derivative_loss = Some(term.per_member);
        }
        let c = self.cfg.logvar_bound_penalty;
        let penalty = ((self.param(&self.max_logvar).sum_all()? - self.param(&self.min_logvar).sum_all()?)? * c)?;
        total = (total + penalty)?;
        for (l, (layer, &d)) in self.layers.iter().zip(&self.cfg.weight_decay).enumerate() {
            if d > 0.0 {
                match tape.as_mut() {
                    // The same value, outside the graph; the tape adds the gradient
                    // (candle's backward pass of the term made four passes over
                    // every weight: a fifth of the prediction ensemble's step).
                    Some(tape) => {
                        total = (total + (layer.weight.as_tensor().detach().sqr()?.sum_all()? * (0.5 * d))?)?;
                        tape.decay(l, d);
                    }
                    None => total = (total + (self.param(&layer.weight).sqr()?.sum_all()? * (0.5 * d))?)?,
                }
            }
        }
        Ok((LossTerms { total, nll, derivative_loss }, tape))
    }
}

/// Copies of every parameter on their device (snapshots for early stopping and
/// NaN recovery; no host round trip). Each copy is detached: candle records
/// the op of anything computed from a variable, and a recorded op holds its
/// inputs, so each member update's scattered copy held the previous copy alive
/// (about 10 MB per epoch for a preset's ensemble, until the training ended).
struct Snapshot(Vec<Tensor>);

/// A copy of `t` that records no op.
fn plain_copy(t: &Tensor) -> candle_core::Result<Tensor> {
    Ok(t.copy()?.detach())
}

impl Snapshot {
    fn take(vars: &[Var]) -> Result<Self> {
        Ok(Self(vars.iter().map(|v| plain_copy(v.as_tensor())).collect::<candle_core::Result<_>>()?))
    }
    /// Copies member `m`'s slice of every member-indexed parameter (leading axis `E`)
    /// and the whole of the others.
    fn update_member(&mut self, vars: &[Var], members: usize, m: usize) -> Result<()> {
        for (buf, var) in self.0.iter_mut().zip(vars) {
            if var.dims()[0] == members && members > 1 {
                *buf = buf.slice_scatter0(&var.as_tensor().narrow(0, m, 1)?, m)?.detach();
            } else {
                *buf = plain_copy(var.as_tensor())?;
            }
        }
        Ok(())
    }
    /// Copies the parameters shared by all members (the log-variance bounds).
    fn update_shared(&mut self, vars: &[Var], members: usize) -> Result<()> {
        for (buf, var) in self.0.iter_mut().zip(vars) {
            if var.dims()[0] != members {
                *buf = plain_copy(var.as_tensor())?;
            }
        }
        Ok(())
    }
    fn restore(&self, vars: &[Var]) -> Result<()> {
        for (buf, var) in self.0.iter().zip(vars) {
            var.set(buf)?;
        }
        Ok(())
    }
}

/// Step 1 of a training call: the data as the model sees it. The raw inputs
/// `x = (s, a)` and targets `y = (r, s' - s)`, the holdout split (one shuffle),
/// the input scaler fitted on the training rows, and the standardised rows
/// minibatches are drawn from.
struct SplitData {
    /// Raw inputs, `N x in` (the neighbour search's space).
    raw_x: Vec<f64>,
    rows: StandardRows,
    /// Row numbers of the training split, in shuffled order.
    train: Vec<usize>,
    /// Standardised holdout inputs and their targets, on the model's device.
    x_hold: Tensor,
    y_hold: Tensor,
}

/// The rows minibatches are drawn from: standardised inputs `xs` (`N x ind`) and
/// targets `yd` (`N x od`), host-side in f64.
struct StandardRows {
    xs: Vec<f64>,
    yd: Vec<f64>,
    ind: usize,
    od: usize,
}

impl SplitData {
    /// Draws the holdout split from `rng` and sets `ens`'s scaler.
    fn new(ens: &mut ProbabilisticEnsemble, data: &TransitionData, rng: &mut impl Rng) -> Result<Self> {
        let (obs_dim, act_dim) = (ens.obs_dim, ens.act_dim);
        let n = data.rows(obs_dim, act_dim)?;
        let (ind, od) = (ens.in_dim(), ens.out_dim());
        let n_hold = ens.cfg.holdout_rows(n);
        if n < 2 || n_hold >= n {
            return Err(Error::Data(format!("need at least 2 rows with one left for training, got {n}")));
        }
        let mut raw_x = vec![0.0f64; n * ind];
        let mut yd = vec![0.0f64; n * od];
        for r in 0..n {
            for j in 0..obs_dim {
                raw_x[r * ind + j] = data.obs[r * obs_dim + j] as f64;
                yd[r * od + 1 + j] = data.next_obs[r * obs_dim + j] as f64 - data.obs[r * obs_dim + j] as f64;
            }
            for j in 0..act_dim {
                raw_x[r * ind + obs_dim + j] = data.act[r * act_dim + j] as f64;
            }
            yd[r * od] = data.rew[r] as f64;
        }
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(rng);
        let (hold, train) = perm.split_at(n_hold);
        let train = train.to_vec();
        // Scaler fitted on the training split.
        let mut mu = vec![0.0; ind];
        let mut sd = vec![0.0; ind];
        for &r in &train {
            for j in 0..ind {
                mu[j] += raw_x[r * ind + j];
            }
        }
        mu.iter_mut().for_each(|m| *m /= train.len() as f64);
        for &r in &train {
            for j in 0..ind {
                sd[j] += (raw_x[r * ind + j] - mu[j]).powi(2);
            }
        }
        sd.iter_mut().for_each(|s| *s = (*s / train.len() as f64).sqrt());
        ens.set_scaler(mu, sd)?;
        // The scaler as set (a degenerate spread is replaced there).
        let (mu, sd) = (&ens.scaler_mean, &ens.scaler_std);
        let xs: Vec<f64> = raw_x.iter().enumerate().map(|(i, v)| (v - mu[i % ind]) / sd[i % ind]).collect();
        let gather = |rows: &[usize], src: &[f64], width: usize| -> Vec<f64> {
            let mut v = Vec::with_capacity(rows.len() * width);
            for &r in rows {
                v.extend_from_slice(&src[r * width..(r + 1) * width]);
            }
            v
        };
        let (dtype, device) = (ens.dtype, &ens.device);
        let x_hold = host_tensor(gather(hold, &xs, ind), &[n_hold, ind], dtype, device)?;
        let y_hold = host_tensor(gather(hold, &yd, od), &[n_hold, od], dtype, device)?;
        Ok(Self { raw_x, rows: StandardRows { xs, yd, ind, od }, train, x_hold, y_hold })
    }
}

/// Step 2 (with the directional-derivative loss): the neighbour set, the newest
/// `neighbour_set` rows with each point's `n` nearest others (searched once per
/// training call), and each member's own order through its points.
struct NeighbourSet {
    /// Data row of the set's first point.
    first: usize,
    /// `n`.
    neighbours: usize,
    /// `size x n`, row-major, indices into the set.
    table: Vec<u32>,
    /// `m`: neighbours per point in a minibatch; `m < n` draws them afresh each time.
    per_minibatch: usize,
    /// Each member's shuffle of the set's points and its position in it.
    order: Vec<Vec<usize>>,
    pos: Vec<usize>,
}

impl NeighbourSet {
    fn new(cfg: &GradientLossConfig, raw_x: &[f64], ind: usize, members: usize) -> Result<Self> {
        cfg.validate()?;
        let rows = raw_x.len() / ind;
        let size = rows.min(cfg.neighbour_set);
        if size <= cfg.neighbours {
            return Err(Error::Data(format!(
                "the gradient loss needs more than n = {} rows, got {size}",
                cfg.neighbours
            )));
        }
        let first = rows - size;
        let points: Vec<f32> = raw_x[first * ind..].iter().map(|&v| v as f32).collect();
        let opts = ddppo_buffer::NeighbourOptions { standardise: cfg.standardise_search };
        let search = ddppo_buffer::NeighbourIndex::build(&points, ind, cfg.neighbours, &opts)
            .map_err(|e| Error::Data(format!("neighbour search failed: {e}")))?;
        Ok(Self {
            first,
            neighbours: cfg.neighbours,
            table: search.table().to_vec(),
            per_minibatch: cfg.directions(),
            order: vec![(0..size).collect(); members],
            // Past the end: each member shuffles before its first point.
            pos: vec![usize::MAX; members],
        })
    }

    /// `member`'s next point (a data row), its order reshuffled when used up,
    /// and that point's neighbours for this minibatch (data rows) appended to
    /// `out`: all `n`, or `m` of them drawn uniformly without replacement.
    fn next_point(&mut self, member: usize, rng: &mut impl Rng, out: &mut Vec<usize>) -> usize {
        let order = &mut self.order[member];
        if self.pos[member] >= order.len() {
            order.shuffle(rng);
            self.pos[member] = 0;
        }
        let j = order[self.pos[member]];
        self.pos[member] += 1;
        let row = &self.table[j * self.neighbours..(j + 1) * self.neighbours];
        if self.per_minibatch < self.neighbours {
            let drawn = index::sample(rng, self.neighbours, self.per_minibatch);
            out.extend(drawn.iter().map(|c| self.first + row[c] as usize));
        } else {
            out.extend(row.iter().map(|&i| self.first + i as usize));
        }
        self.first + j
    }
}

impl StandardRows {
    /// One minibatch (section 2: rows `lo..hi` of each member's own shuffle `idx`;
    /// section 3: as many points from each member's own order through the
    /// neighbour set, with their neighbours), written straight into the model's
    /// element type (the same rounding as converting afterwards).
    fn minibatch<T: candle_core::WithDType>(
        &self,
        idx: &[Vec<usize>],
        (lo, hi): (usize, usize),
        set: Option<&mut NeighbourSet>,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Result<LossBatch> {
        let (xs, yd, ind, od) = (&self.xs, &self.yd, self.ind, self.od);
        let (e, b) = (idx.len(), hi - lo);
        let cast = |v: &[f64], out: &mut Vec<T>| out.extend(v.iter().map(|&x| T::from_f64(x)));
        let mut x = Vec::with_capacity(e * b * ind);
        let mut y = Vec::with_capacity(e * b * od);
        for p in idx {
            for &r in &p[lo..hi] {
                cast(&xs[r * ind..(r + 1) * ind], &mut x);
                cast(&yd[r * od..(r + 1) * od], &mut y);
            }
        }
        let neighbours = match set {
            Some(set) => {
                let k = set.per_minibatch;
                let mut points = Vec::with_capacity(e * b * ind);
                let mut directions = Vec::with_capacity(e * b * k * ind);
                let mut differences = Vec::with_capacity(e * b * k * od);
                let mut near = Vec::with_capacity(k);
                for m in 0..e {
                    for _ in 0..b {
                        near.clear();
                        let rj = set.next_point(m, rng, &mut near);
                        let (xj, yj) = (&xs[rj * ind..(rj + 1) * ind], &yd[rj * od..(rj + 1) * od]);
                        cast(xj, &mut points);
                        for &ri in &near {
                            let (xi, yi) = (&xs[ri * ind..(ri + 1) * ind], &yd[ri * od..(ri + 1) * od]);
                            directions.extend(xi.iter().zip(xj).map(|(a, c)| T::from_f64(a - c)));
                            differences.extend(yi.iter().zip(yj).map(|(a, c)| T::from_f64(a - c)));
                        }
                    }
                }
                Some(NeighbourBatch {
                    points: crate::transfer::upload(points, &[e, b, ind], device)?,
                    directions: crate::transfer::upload(directions, &[e, b * k, ind], device)?,
                    differences: crate::transfer::upload(differences, &[e, b * k, od], device)?,
                    k,
                })
            }
            None => None,
        };
        Ok(LossBatch {
            x: crate::transfer::upload(x, &[e, b, ind], device)?,
            y: crate::transfer::upload(y, &[e, b, od], device)?,
            neighbours,
        })
    }
}

/// Minibatches gathered on the device (section 2 and 3 as in
/// [`StandardRows::minibatch`]): the standardised inputs and targets are uploaded
/// once per training call, in f64 so that gathered rows and neighbour
/// differences round to the model's dtype exactly as the host path's do; the
/// row indices of a whole epoch go up in one upload. Off the CPU this replaces
/// one upload of every minibatch's data. Drawn neighbours
/// (`gradient.directions_per_step`) are drawn on the host as in the host path.
struct DeviceRows {
    /// `N x in`, f64.
    xs: Tensor,
    /// `N x out`, f64.
    yd: Tensor,
}

/// One epoch's row indices on the device: per minibatch `E * B` rows for `x`
/// and `y`, then with the directional-derivative loss `E * B` points and their
/// `E * B * k` neighbours; `spans` holds each minibatch's offset and `B`.
struct EpochRows {
    rows: Tensor,
    spans: Vec<(usize, usize)>,
}

impl DeviceRows {
    fn new(rows: &StandardRows, device: &Device) -> Result<Self> {
        let n = rows.yd.len() / rows.od;
        Ok(Self {
            xs: crate::transfer::upload(rows.xs.clone(), &[n, rows.ind], device)?,
            yd: crate::transfer::upload(rows.yd.clone(), &[n, rows.od], device)?,
        })
    }

    /// Draws the epoch's minibatches with the same random calls, in the same
    /// order, as the host path, and uploads their rows.
    fn epoch(
        idx: &[Vec<usize>],
        batch_size: usize,
        mut set: Option<&mut NeighbourSet>,
        rng: &mut impl Rng,
        device: &Device,
    ) -> Result<EpochRows> {
        let (e, n) = (idx.len(), idx.first().map_or(0, Vec::len));
        let mut rows: Vec<u32> = Vec::new();
        let mut spans = Vec::new();
        let mut near = Vec::new();
        let mut lo = 0;
        while lo < n {
            let hi = (lo + batch_size).min(n);
            spans.push((rows.len(), hi - lo));
            for p in idx {
                rows.extend(p[lo..hi].iter().map(|&r| r as u32));
            }
            if let Some(set) = set.as_deref_mut() {
                near.clear();
                for m in 0..e {
                    for _ in lo..hi {
                        rows.push(set.next_point(m, rng, &mut near) as u32);
                    }
                }
                rows.extend(near.iter().map(|&i| i as u32));
            }
            lo = hi;
        }
        let len = rows.len();
        Ok(EpochRows { rows: crate::transfer::upload(rows, &[len], device)?, spans })
    }

    /// Minibatch `i` of `epoch` (`k` directions per point with the
    /// directional-derivative loss), gathered and converted on the device.
    fn minibatch(&self, epoch: &EpochRows, i: usize, e: usize, k: Option<usize>, dtype: DType) -> Result<LossBatch> {
        let (off, b) = epoch.spans[i];
        let (ind, od) = (self.xs.dim(1)?, self.yd.dim(1)?);
        let rows = epoch.rows.narrow(0, off, e * b)?;
        let x = self.xs.index_select(&rows, 0)?.to_dtype(dtype)?.reshape((e, b, ind))?;
        let y = self.yd.index_select(&rows, 0)?.to_dtype(dtype)?.reshape((e, b, od))?;
        let neighbours = match k {
            Some(k) => {
                let points = epoch.rows.narrow(0, off + e * b, e * b)?;
                let near = epoch.rows.narrow(0, off + 2 * e * b, e * b * k)?;
                let (xj, yj) = (self.xs.index_select(&points, 0)?, self.yd.index_select(&points, 0)?);
                let xi = self.xs.index_select(&near, 0)?.reshape((e * b, k, ind))?;
                let yi = self.yd.index_select(&near, 0)?.reshape((e * b, k, od))?;
                // x_i - x_j and y_i - y_j in f64, then rounded (equation 9).
                let directions = xi.broadcast_sub(&xj.unsqueeze(1)?)?.to_dtype(dtype)?.reshape((e, b * k, ind))?;
                let differences = yi.broadcast_sub(&yj.unsqueeze(1)?)?.to_dtype(dtype)?.reshape((e, b * k, od))?;
                Some(NeighbourBatch { points: xj.to_dtype(dtype)?.reshape((e, b, ind))?, directions, differences, k })
            }
            None => None,
        };
        Ok(LossBatch { x, y, neighbours })
    }
}

/// Everything one training call changes in an ensemble (parameters, scaler,
/// elites, optimiser state), copied, so an interrupted call can be undone.
#[derive(Clone)]
pub struct TrainingSnapshot {
    ensemble: EnsembleSnapshot,
    opt: Option<OptimizerState>,
}

/// What every epoch of one training call reads.
struct EpochInputs<'a> {
    split: &'a SplitData,
    /// The rows on the device, when minibatches are gathered there.
    device_rows: Option<&'a DeviceRows>,
    batch_size: usize,
    /// `w` of equation 10 (0 without the directional-derivative loss).
    weight: f64,
    interrupt: Option<&'a AtomicBool>,
}

/// What one epoch reports: sums over its minibatches.
struct EpochSums {
    /// Total losses.
    loss: f64,
    /// `R`, averaged over the members (0 without the directional-derivative loss).
    derivative_loss: f64,
    minibatches: usize,
}

/// Step 3: one epoch, each member through its own shuffle of the training
/// split. A non-finite loss is [`Error::NonFinite`] (the caller puts the
/// weights back).
fn run_epoch(
    ens: &ProbabilisticEnsemble,
    optimizer: &mut ModelOptimizer,
    inputs: &EpochInputs,
    mut set: Option<&mut NeighbourSet>,
    epoch: usize,
    rng: &mut impl Rng,
) -> Result<EpochSums> {
    let train = &inputs.split.train;
    let e = ens.cfg.ensemble_size;
    let mut idx: Vec<Vec<usize>> = Vec::with_capacity(e);
    for _ in 0..e {
        let mut p = train.clone();
        p.shuffle(rng);
        idx.push(p);
    }
    let (dtype, device) = (ens.dtype, &ens.device);
    // Checked per minibatch: a signal must be answered within seconds even when
    // one epoch takes a minute.
    let interrupted = || inputs.interrupt.is_some_and(|f| f.load(Ordering::Relaxed));
    if let Some(rows) = inputs.device_rows {
        let k = set.as_ref().map(|s| s.per_minibatch);
        let epoch_rows = DeviceRows::epoch(&idx, inputs.batch_size, set, rng, device)?;
        // Sums on the device, read back once at the end of the epoch: a
        // non-finite loss is caught there (the weights before this training call
        // are restored either way).
        let mut sums: Option<(Tensor, Tensor, Option<Tensor>)> = None;
        for i in 0..epoch_rows.spans.len() {
            if interrupted() {
                return Err(Error::Interrupted);
            }
            let batch = rows.minibatch(&epoch_rows, i, e, k, dtype)?;
            let (terms, tape) = ens.training_loss(&batch, inputs.weight, true)?;
            let total = terms.total.to_dtype(DType::F64)?;
            let nll = terms.nll.to_dtype(DType::F64)?;
            let r = terms.derivative_loss.as_ref().map(|r| r.to_dtype(DType::F64)).transpose()?;
            sums = Some(match sums {
                None => (total, nll, r),
                Some((t, n, rs)) => (
                    (t + total)?,
                    (n + nll)?,
                    match (rs, r) {
                        (Some(a), Some(b)) => Some((a + b)?),
                        _ => None,
                    },
                ),
            });
            optimizer.backward_step_taped(&terms.total, tape)?;
        }
        let (t, n, rs) = sums.ok_or_else(|| Error::Internal("an epoch without minibatches".into()))?;
        let mut parts = vec![t.reshape(1)?, n];
        parts.extend(rs);
        let v = crate::transfer::download_f64(&Tensor::cat(&parts, 0)?)?;
        let (nll, r) = (&v[1..1 + e], v.get(1 + e..));
        if !v[0].is_finite() {
            let member = (0..e).find(|&m| !nll[m].is_finite() || r.is_some_and(|r| !r[m].is_finite()));
            return Err(Error::NonFinite { member, epoch });
        }
        return Ok(EpochSums {
            loss: v[0],
            derivative_loss: r.map_or(0.0, |r| r.iter().sum::<f64>() / e as f64),
            minibatches: epoch_rows.spans.len(),
        });
    }
    let mut sums = EpochSums { loss: 0.0, derivative_loss: 0.0, minibatches: 0 };
    let mut lo = 0;
    while lo < train.len() {
        if interrupted() {
            return Err(Error::Interrupted);
        }
        let hi = (lo + inputs.batch_size).min(train.len());
        let rows = &inputs.split.rows;
        let set = set.as_deref_mut();
        let batch = match dtype {
            DType::F32 => rows.minibatch::<f32>(&idx, (lo, hi), set, rng, device)?,
            DType::F64 => rows.minibatch::<f64>(&idx, (lo, hi), set, rng, device)?,
            d => return Err(Error::Internal(format!("dtype {d:?}"))),
        };
        let (terms, tape) = ens.training_loss(&batch, inputs.weight, true)?;
        let total = crate::transfer::download_scalar(&terms.total)?;
        let r = terms.derivative_loss.as_ref().map(crate::transfer::download_f64).transpose()?;
        if !total.is_finite() {
            let nll = crate::transfer::download_f64(&terms.nll)?;
            let member = (0..e).find(|&m| !nll[m].is_finite() || r.as_ref().is_some_and(|r| !r[m].is_finite()));
            return Err(Error::NonFinite { member, epoch });
        }
        optimizer.backward_step_taped(&terms.total, tape)?;
        sums.loss += total;
        if let Some(r) = r {
            sums.derivative_loss += r.iter().sum::<f64>() / e as f64;
        }
        sums.minibatches += 1;
        lo = hi;
    }
    Ok(sums)
}

/// Step 4: MBPO's early stopping. A member improves when its holdout loss
/// drops by more than `improvement` relative to its best; its weights are
/// snapshotted then, and restored at the end of the call.
struct EarlyStopping {
    best: Snapshot,
    best_mse: Vec<f64>,
    /// Epochs since any member last improved (not counting the cold start's wait).
    since: usize,
    /// Epochs still free of the count, on a cold start, until learning has
    /// begun (`EnsembleConfig::cold_start_wait`, [`COLD_START_DROP`]).
    wait: usize,
    /// The members' mean holdout MSE after epoch 1.
    first_mean: Option<f64>,
}

/// On a cold start, learning has begun once the members' mean holdout MSE is
/// this fraction below its epoch-1 value; until then (for at most
/// `cold_start_wait` epochs) epochs without improvement are not counted.
pub const COLD_START_DROP: f64 = 0.1;

impl EarlyStopping {
    fn new(vars: &[Var], members: usize, wait: usize) -> Result<Self> {
        Ok(Self {
            best: Snapshot::take(vars)?,
            best_mse: vec![f64::INFINITY; members],
            since: 0,
            wait,
            first_mean: None,
        })
    }

    /// Takes one epoch's holdout MSE per member.
    fn observe(&mut self, vars: &[Var], mse: &[f64], improvement: f64) -> Result<()> {
        let e = self.best_mse.len();
        let mut improved = false;
        for (m, &now) in mse.iter().enumerate() {
            let best = self.best_mse[m];
            let gain = if best.is_finite() { (best - now) / best } else { f64::INFINITY };
            if gain > improvement {
                self.best_mse[m] = now;
                self.best.update_member(vars, e, m)?;
                improved = true;
            }
        }
        let mean = mse.iter().sum::<f64>() / mse.len().max(1) as f64;
        let first = *self.first_mean.get_or_insert(mean);
        if mean < (1.0 - COLD_START_DROP) * first {
            self.wait = 0;
        }
        if improved {
            self.best.update_shared(vars, e)?;
            self.since = 0;
        } else if self.wait > 0 {
            self.wait -= 1;
        } else {
            self.since += 1;
        }
        Ok(())
    }
}

/// The epoch cap of a training call: `max_epochs`, and on a warm start
/// (`cold` false) `warm_max_epochs` too, the smaller where both are set.
fn epoch_cap(cfg: &EnsembleConfig, cold: bool) -> Option<usize> {
    let warm = if cold { None } else { cfg.warm_max_epochs };
    match (cfg.max_epochs, warm) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// One training call: the four steps, with the weights before the call put
/// back (and Adam restarted) on a non-finite loss.
fn train_ensemble(
    ens: &mut ProbabilisticEnsemble,
    opt: &mut Option<ModelOptimizer>,
    data: &TransitionData,
    derivative_loss: Option<&GradientLossConfig>,
    rng: &mut impl Rng,
    interrupt: Option<&AtomicBool>,
    on_epoch: &mut dyn FnMut(&ProbabilisticEnsemble, &EpochStats) -> Result<()>,
) -> Result<TrainReport> {
    let split = SplitData::new(ens, data, rng)?;
    let cfg = ens.cfg.clone();
    let e = cfg.ensemble_size;
    let mut set = derivative_loss.map(|c| NeighbourSet::new(c, &split.raw_x, split.rows.ind, e)).transpose()?;
    let vars = ens.vars();
    let cold = opt.is_none();
    if cold {
        *opt = Some(ModelOptimizer::new(ens)?);
    }
    let device_rows = if ens.device_batches { Some(DeviceRows::new(&split.rows, &ens.device)?) } else { None };
    let inputs = EpochInputs {
        split: &split,
        device_rows: device_rows.as_ref(),
        batch_size: cfg.batch_size,
        weight: derivative_loss.map_or(0.0, |c| c.weight),
        interrupt,
    };
    let before = Snapshot::take(&vars)?;
    let mut stop = EarlyStopping::new(&vars, e, if cold { cfg.cold_start_wait } else { 0 })?;
    let cap = epoch_cap(&cfg, cold);
    let mut epoch = 0usize;
    let (train_loss, derivative_mean) = loop {
        epoch += 1;
        let optimizer = opt.as_mut().ok_or_else(|| Error::Internal("optimiser missing".into()))?;
        let epoch_result = run_epoch(ens, optimizer, &inputs, set.as_mut(), epoch, rng).and_then(|sums| {
            let mse = ens.member_mse(&split.x_hold, &split.y_hold)?;
            match mse.iter().position(|v| !v.is_finite()) {
                Some(member) => Err(Error::NonFinite { member: Some(member), epoch }),
                None => Ok((sums, mse)),
            }
        });
        let (sums, mse) = match epoch_result {
            Err(err @ Error::NonFinite { .. }) => {
                before.restore(&vars)?;
                *opt = None;
                return Err(err);
            }
            r => r?,
        };
        let train_loss = sums.loss / sums.minibatches as f64;
        let derivative_mean = set.as_ref().map(|_| sums.derivative_loss / sums.minibatches as f64);
        on_epoch(ens, &EpochStats { epoch, holdout_mse: mse.clone(), train_loss, derivative_loss: derivative_mean })?;
        stop.observe(&vars, &mse, cfg.improvement)?;
        if stop.since >= cfg.patience || cap.is_some_and(|max| epoch >= max) {
            break (train_loss, derivative_mean);
        }
    };
    stop.best.restore(&vars)?;
    let mut order: Vec<usize> = (0..e).collect();
    order.sort_by(|&a, &b| stop.best_mse[a].total_cmp(&stop.best_mse[b]));
    ens.elites = order[..cfg.elites].to_vec();
    Ok(TrainReport { epochs: epoch, holdout_mse: stop.best_mse, train_loss, derivative_loss: derivative_mean })
}

/// A probabilistic ensemble with its training rule: Gaussian NLL (the
/// prediction model, section 2), plus `w R`, the directional-derivative loss
/// (the gradient model, section 3, equation 10), when built with a
/// [`GradientLossConfig`].
pub struct ModelEnsemble {
    core: ProbabilisticEnsemble,
    opt: Option<ModelOptimizer>,
    derivative_loss: Option<GradientLossConfig>,
    interrupt: Option<Arc<AtomicBool>>,
}

impl ModelEnsemble {
    /// `derivative_loss`: `None` trains by NLL only; `Some` adds `w R` with the
    /// neighbours searched among the newest `neighbour_set` rows of each call's data.
    pub fn new(
        obs_dim: usize,
        act_dim: usize,
        cfg: &EnsembleConfig,
        derivative_loss: Option<&GradientLossConfig>,
        device: &Device,
        dtype: DType,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        if let Some(c) = derivative_loss {
            c.validate()?;
        }
        Ok(Self {
            core: ProbabilisticEnsemble::new(obs_dim, act_dim, cfg, device, dtype, rng)?,
            opt: None,
            derivative_loss: derivative_loss.cloned(),
            interrupt: None,
        })
    }
    /// Trains on all of `data` with early stopping; restores each member's best weights.
    pub fn train(&mut self, data: &TransitionData, rng: &mut impl Rng) -> Result<TrainReport> {
        self.train_with(data, rng, &mut |_, _| Ok(()))
    }
    /// As [`train`](Self::train), calling `on_epoch` after every epoch's holdout evaluation.
    pub fn train_with(
        &mut self,
        data: &TransitionData,
        rng: &mut impl Rng,
        on_epoch: &mut dyn FnMut(&ProbabilisticEnsemble, &EpochStats) -> Result<()>,
    ) -> Result<TrainReport> {
        train_ensemble(
            &mut self.core,
            &mut self.opt,
            data,
            self.derivative_loss.as_ref(),
            rng,
            self.interrupt.as_deref(),
            on_epoch,
        )
    }
    pub fn ensemble(&self) -> &ProbabilisticEnsemble {
        &self.core
    }
    pub fn ensemble_mut(&mut self) -> &mut ProbabilisticEnsemble {
        &mut self.core
    }
    /// The optimiser's state for a checkpoint; `None` before the first training call
    /// (and after a training call stopped by a non-finite loss, which resets it).
    /// Together with [`ProbabilisticEnsemble::save`] this is everything training
    /// carries from one call to the next.
    pub fn optimizer_state(&self) -> Option<OptimizerState> {
        self.opt.as_ref().map(ModelOptimizer::state)
    }
    /// Restores a state read by [`optimizer_state`](Self::optimizer_state) (`None`:
    /// the next training call starts Adam afresh). The moments must match this
    /// model's parameters in number and shape; on a mismatch nothing is changed.
    pub fn restore_optimizer_state(&mut self, state: Option<OptimizerState>) -> Result<()> {
        self.opt = match state {
            Some(s) => Some(ModelOptimizer::from_state(&self.core, &s)?),
            None => None,
        };
        Ok(())
    }
    /// A flag that stops a training call between two minibatches with
    /// [`Error::Interrupted`] (the ensemble is then part-trained: restore a
    /// [`TrainingSnapshot`] taken before the call).
    pub fn set_interrupt(&mut self, flag: Option<Arc<AtomicBool>>) {
        self.interrupt = flag;
    }
    /// A copy of everything a training call changes.
    pub fn training_snapshot(&self) -> Result<TrainingSnapshot> {
        Ok(TrainingSnapshot { ensemble: self.core.snapshot()?, opt: self.optimizer_state() })
    }
    /// Puts back a [`training_snapshot`](Self::training_snapshot): parameters,
    /// scaler, elites and optimiser state are as when it was taken.
    pub fn restore_training_snapshot(&mut self, s: &TrainingSnapshot) -> Result<()> {
        self.core.restore(&s.ensemble)?;
        self.restore_optimizer_state(s.opt.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot updated member by member holds plain copies: none of its
    /// tensors records an op, so none keeps an earlier copy alive.
    #[test]
    fn snapshot_updates_record_no_ops() {
        let dev = candle_core::Device::Cpu;
        let vars = [
            Var::from_tensor(&Tensor::arange(0f32, 12.0, &dev).unwrap().reshape((3, 4)).unwrap()).unwrap(),
            Var::from_tensor(&Tensor::ones(2, candle_core::DType::F32, &dev).unwrap()).unwrap(),
        ];
        let mut snap = Snapshot::take(&vars).unwrap();
        vars[0].set(&Tensor::zeros((3, 4), candle_core::DType::F32, &dev).unwrap()).unwrap();
        for _ in 0..3 {
            snap.update_member(&vars, 3, 1).unwrap();
        }
        snap.update_shared(&vars, 3).unwrap();
        assert!(snap.0.iter().all(|t| !t.track_op()), "a snapshot tensor records an op");
        // Member 1's row now holds the variable's zeros, the others their old values.
        let got = snap.0[0].to_vec2::<f32>().unwrap();
        assert_eq!(got, vec![vec![0.0, 1.0, 2.0, 3.0], vec![0.0; 4], vec![8.0, 9.0, 10.0, 11.0]]);
    }

    /// Epochs a training runs under the stopping rule, for one member's holdout MSE per epoch.
    fn epochs_run(mse: &[f64], patience: usize, wait: usize) -> usize {
        let mut stop = EarlyStopping::new(&[], 1, wait).unwrap();
        for (i, &m) in mse.iter().enumerate() {
            stop.observe(&[], &[m], 0.01).unwrap();
            if stop.since >= patience {
                return i + 1;
            }
        }
        mse.len()
    }

    #[test]
    fn a_cold_start_waits_until_learning_has_begun() {
        // The shape measured on Ant's first 5,000 transitions: under 1% per
        // epoch for six epochs, then learning, then a plateau.
        let mut curve = vec![6.70, 6.73, 6.71, 6.69, 6.68, 6.66, 6.63, 6.50, 6.30, 6.00, 5.70, 5.50, 5.40];
        curve.extend([5.40; 7]);
        // The plain rule stops at epoch 6, before anything was learnt.
        assert_eq!(epochs_run(&curve, 5, 0), 6);
        // Waiting: learning has begun at epoch 10 (6.00, 10% below 6.70); the
        // improvements of epochs 7-13 reset the count, 14-18 do not improve.
        assert_eq!(epochs_run(&curve, 5, 50), 18);
        // A single improvement of 1% on the plateau does not end the wait.
        let blip = [6.70, 6.70, 6.60, 6.60, 6.60, 6.60, 6.60, 6.60, 6.60, 6.60, 6.60, 6.60];
        assert_eq!(epochs_run(&blip, 5, 0), 8);
        assert_eq!(epochs_run(&blip, 5, 50), blip.len());
        // The wait is bounded: a flat curve runs 1 + wait + patience epochs.
        assert_eq!(epochs_run(&[3.0; 40], 5, 3), 9);
        assert_eq!(epochs_run(&[3.0; 40], 5, 0), 6);
        // Improving from the start, both rules agree.
        let learning: Vec<f64> = (0..30).map(|i| if i < 20 { 10.0 * 0.9f64.powi(i) } else { 1.2 }).collect();
        assert_eq!(epochs_run(&learning, 5, 50), epochs_run(&learning, 5, 0));
    }
}
