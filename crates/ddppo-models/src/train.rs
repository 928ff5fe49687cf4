//! Training of the ensembles: MBPO's schedule (ALGORITHM.md section 2) and the
//! directional-derivative loss of the gradient model (section 3, equations 9 and 10).
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand::seq::SliceRandom;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::adam::{ModelOptimizer, OptimizerState};
use crate::ensemble::{EnsembleSnapshot, ProbabilisticEnsemble};
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
        if self.obs.len() != n * obs_dim
            || self.next_obs.len() != n * obs_dim
            || self.act.len() != n * act_dim
        {
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
    /// Mean `R` over the minibatches of the last epoch (gradient model only).
    pub grad_loss: Option<f64>,
}

/// Passed to the per-epoch observer.
#[derive(Clone, Debug)]
pub struct EpochStats {
    /// 1-based.
    pub epoch: usize,
    /// Holdout MSE of `(r, ds)` per member, current weights.
    pub holdout_mse: Vec<f64>,
    pub train_loss: f64,
    pub grad_loss: Option<f64>,
}

/// One minibatch for the loss, in standardised inputs (host-built, member-major).
///
/// `x`: `E x B x in`, `y`: `E x B x out` targets `(r, ds)`; with the gradient loss
/// also `xg`: `E x Bg x in` points, `t0`: `E x (Bg * k) x in` the standardised
/// directions `x_i - x_j` to their `k` neighbours and `dy`: `E x (Bg * k) x out`
/// the differences `y_i - y_j` (equation 9; the `s` part of `s'` cancels against the
/// identity in `g = s + ds`, so the `ds` difference is the target for `J_ds · v`).
pub struct LossBatch {
    pub x: Tensor,
    pub y: Tensor,
    pub grad: Option<GradBatch>,
}

pub struct GradBatch {
    pub xg: Tensor,
    pub t0: Tensor,
    pub dy: Tensor,
    pub k: usize,
}

/// The loss terms of one minibatch.
pub struct LossTerms {
    /// Everything: `sum_e NLL_e + w R + penalty + decay` (equation 10 as a loss).
    pub total: Tensor,
    /// `E`: Gaussian NLL per member.
    pub nll: Tensor,
    /// `E`: `R` per member (mean over points, neighbours and dims).
    pub grad: Option<Tensor>,
}

impl ProbabilisticEnsemble {
    /// The training loss on one minibatch. `w` weighs `R` (mean over members).
    pub fn loss(&self, batch: &LossBatch, w: f64) -> Result<LossTerms> {
        let b = batch.x.dim(1)?;
        let out = match &batch.grad {
            Some(g) => self.forward_jv(&Tensor::cat(&[&batch.x, &g.xg], 1)?, b, &g.t0, g.k)?,
            None => self.forward_std(&batch.x, None, None)?,
        };
        let mean = out.mean.narrow(1, 0, b)?;
        let lv = out.logvar.narrow(1, 0, b)?;
        // Gaussian NLL per member: mean((mu - y)^2 exp(-lv)) + mean(lv).
        let nll = ((mean - &batch.y)?.sqr()? * lv.neg()?.exp()?)?
            .add(&lv)?
            .mean((1, 2))?;
        let mut total = nll.sum_all()?;
        let mut grad = None;
        if let (Some(g), Some(t)) = (&batch.grad, out.tangent) {
            // Equation 9: (J_g(x_j) v_ij - (y_i - y_j))^2, mean over points, neighbours, dims.
            let r = (t - &g.dy)?.sqr()?.mean((1, 2))?;
            total = (total + (r.mean_all()? * w)?)?;
            grad = Some(r);
        }
        let c = self.cfg.logvar_bound_penalty;
        let penalty = ((self.param(&self.max_logvar).sum_all()?
            - self.param(&self.min_logvar).sum_all()?)?
            * c)?;
        total = (total + penalty)?;
        for (layer, &d) in self.layers.iter().zip(&self.cfg.weight_decay) {
            if d > 0.0 {
                total = (total + (self.param(&layer.weight).sqr()?.sum_all()? * (0.5 * d))?)?;
            }
        }
        Ok(LossTerms { total, nll, grad })
    }
}

/// Copies of every parameter on their device (snapshots for early stopping and
/// NaN recovery; no host round trip).
struct Snapshot(Vec<Tensor>);

impl Snapshot {
    fn take(vars: &[Var]) -> Result<Self> {
        Ok(Self(vars.iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<_>>()?))
    }
    /// Copies member `m`'s slice of every member-indexed parameter (leading axis `E`)
    /// and the whole of the others.
    fn update_member(&mut self, vars: &[Var], members: usize, m: usize) -> Result<()> {
        for (buf, var) in self.0.iter_mut().zip(vars) {
            if var.dims()[0] == members && members > 1 {
                *buf = buf.slice_scatter0(&var.as_tensor().narrow(0, m, 1)?, m)?;
            } else {
                *buf = var.as_tensor().copy()?;
            }
        }
        Ok(())
    }
    /// Copies the parameters shared by all members (the log-variance bounds).
    fn update_shared(&mut self, vars: &[Var], members: usize) -> Result<()> {
        for (buf, var) in self.0.iter_mut().zip(vars) {
            if var.dims()[0] != members {
                *buf = var.as_tensor().copy()?;
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

/// Neighbour table (`N x n`, row-major) over `points` (`N x dim`): each point's `n`
/// nearest others by squared Euclidean distance.
fn neighbour_table(points: &[f32], dim: usize, n: usize, standardise: bool) -> Result<Vec<u32>> {
    let opts = ddppo_buffer::NeighbourOptions { standardise };
    let index = ddppo_buffer::NeighbourIndex::build(points, dim, n, &opts)
        .map_err(|e| Error::Data(format!("neighbour search failed: {e}")))?;
    Ok(index.table().to_vec())
}

/// The rows minibatches are drawn from: standardised inputs `xs` (`N x ind`) and
/// targets `yd` (`N x od`), host-side in f64.
struct BatchRows<'a> {
    xs: &'a [f64],
    yd: &'a [f64],
    ind: usize,
    od: usize,
}

impl BatchRows<'_> {
    /// One minibatch (section 2: rows `lo..hi` of each member's own shuffle `idx`;
    /// section 3: with `nb = (k, first, ns, table)` as many points from each member's
    /// own shuffle of the neighbour set, with their `k` neighbours), written straight
    /// into the model's element type (the same rounding as converting afterwards).
    #[allow(clippy::too_many_arguments)]
    fn minibatch<T: candle_core::WithDType>(
        &self,
        idx: &[Vec<usize>],
        lo: usize,
        hi: usize,
        nb: Option<(usize, usize, usize, &[u32])>,
        gperm: &mut Vec<Vec<usize>>,
        gpos: &mut [usize],
        rng: &mut impl Rng,
        device: &Device,
    ) -> Result<LossBatch> {
        let (xs, yd, ind, od) = (self.xs, self.yd, self.ind, self.od);
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
        let grad = match nb {
            Some((k, first, ns, table)) => {
                let mut xg = Vec::with_capacity(e * b * ind);
                let mut t0 = Vec::with_capacity(e * b * k * ind);
                let mut dy = Vec::with_capacity(e * b * k * od);
                init_points(gperm, e, ns);
                for m in 0..e {
                    for _ in 0..b {
                        let j = next_point(gperm, gpos, m, rng);
                        let rj = first + j;
                        let (xj, yj) = (&xs[rj * ind..(rj + 1) * ind], &yd[rj * od..(rj + 1) * od]);
                        cast(xj, &mut xg);
                        for &i in &table[j * k..(j + 1) * k] {
                            let ri = first + i as usize;
                            let (xi, yi) =
                                (&xs[ri * ind..(ri + 1) * ind], &yd[ri * od..(ri + 1) * od]);
                            t0.extend(xi.iter().zip(xj).map(|(a, c)| T::from_f64(a - c)));
                            dy.extend(yi.iter().zip(yj).map(|(a, c)| T::from_f64(a - c)));
                        }
                    }
                }
                Some(GradBatch {
                    xg: crate::transfer::upload(xg, &[e, b, ind], device)?,
                    t0: crate::transfer::upload(t0, &[e, b * k, ind], device)?,
                    dy: crate::transfer::upload(dy, &[e, b * k, od], device)?,
                    k,
                })
            }
            None => None,
        };
        Ok(LossBatch {
            x: crate::transfer::upload(x, &[e, b, ind], device)?,
            y: crate::transfer::upload(y, &[e, b, od], device)?,
            grad,
        })
    }
}

/// Sets up the per-member shuffles of the neighbour set (`ns` points) once.
fn init_points(gperm: &mut Vec<Vec<usize>>, e: usize, ns: usize) {
    if gperm.len() != e {
        *gperm = vec![(0..ns).collect(); e];
    }
}

/// Member `m`'s next point of the neighbour set: an independent shuffle per
/// member, reshuffled when used up.
fn next_point(gperm: &mut [Vec<usize>], gpos: &mut [usize], m: usize, rng: &mut impl Rng) -> usize {
    if gpos[m] >= gperm[m].len() {
        gperm[m].shuffle(rng);
        gpos[m] = 0;
    }
    gpos[m] += 1;
    gperm[m][gpos[m] - 1]
}

/// Minibatches gathered on the device (section 2 and 3 as in
/// [`BatchRows::minibatch`]): the standardised inputs and targets are uploaded
/// once per training call, in f64 so that gathered rows and neighbour
/// differences round to the model's dtype exactly as the host path's do; the
/// row indices of a whole epoch go up in one upload. Off the CPU this replaces
/// one upload of every minibatch's data.
struct DeviceRows {
    /// `N x in`, f64.
    xs: Tensor,
    /// `N x out`, f64.
    yd: Tensor,
}

/// One epoch's row indices on the device: per minibatch `E * B` rows for `x`
/// and `y`, then with the gradient loss `E * B` points and their `E * B * k`
/// neighbours; `spans` holds each minibatch's offset and `B`.
struct EpochRows {
    rows: Tensor,
    spans: Vec<(usize, usize)>,
}

impl DeviceRows {
    /// Draws the epoch's minibatches with the same random calls, in the same
    /// order, as the host path, and uploads their rows.
    #[allow(clippy::too_many_arguments)]
    fn epoch(
        idx: &[Vec<usize>],
        bs: usize,
        nb: Option<(usize, usize, usize, &[u32])>,
        gperm: &mut Vec<Vec<usize>>,
        gpos: &mut [usize],
        rng: &mut impl Rng,
        device: &Device,
    ) -> Result<EpochRows> {
        let (e, n) = (idx.len(), idx.first().map_or(0, Vec::len));
        let mut rows: Vec<u32> = Vec::new();
        let mut spans = Vec::new();
        let mut lo = 0;
        while lo < n {
            let hi = (lo + bs).min(n);
            spans.push((rows.len(), hi - lo));
            for p in idx {
                rows.extend(p[lo..hi].iter().map(|&r| r as u32));
            }
            if let Some((k, first, ns, table)) = nb {
                init_points(gperm, e, ns);
                let mut neighbours = Vec::with_capacity(e * (hi - lo) * k);
                for m in 0..e {
                    for _ in lo..hi {
                        let j = next_point(gperm, gpos, m, rng);
                        rows.push((first + j) as u32);
                        neighbours.extend(table[j * k..(j + 1) * k].iter().map(|&i| first as u32 + i));
                    }
                }
                rows.extend(neighbours);
            }
            lo = hi;
        }
        let len = rows.len();
        Ok(EpochRows { rows: crate::transfer::upload(rows, &[len], device)?, spans })
    }

    /// Minibatch `i` of `epoch`, gathered and converted on the device.
    fn minibatch(&self, epoch: &EpochRows, i: usize, e: usize, k: Option<usize>, dtype: DType) -> Result<LossBatch> {
        let (off, b) = epoch.spans[i];
        let (ind, od) = (self.xs.dim(1)?, self.yd.dim(1)?);
        let rows = epoch.rows.narrow(0, off, e * b)?;
        let x = self.xs.index_select(&rows, 0)?.to_dtype(dtype)?.reshape((e, b, ind))?;
        let y = self.yd.index_select(&rows, 0)?.to_dtype(dtype)?.reshape((e, b, od))?;
        let grad = match k {
            Some(k) => {
                let points = epoch.rows.narrow(0, off + e * b, e * b)?;
                let neighbours = epoch.rows.narrow(0, off + 2 * e * b, e * b * k)?;
                let (xj, yj) = (self.xs.index_select(&points, 0)?, self.yd.index_select(&points, 0)?);
                let xi = self.xs.index_select(&neighbours, 0)?.reshape((e * b, k, ind))?;
                let yi = self.yd.index_select(&neighbours, 0)?.reshape((e * b, k, od))?;
                // x_i - x_j and y_i - y_j in f64, then rounded (equation 9).
                let t0 = xi.broadcast_sub(&xj.unsqueeze(1)?)?.to_dtype(dtype)?.reshape((e, b * k, ind))?;
                let dy = yi.broadcast_sub(&yj.unsqueeze(1)?)?.to_dtype(dtype)?.reshape((e, b * k, od))?;
                Some(GradBatch { xg: xj.to_dtype(dtype)?.reshape((e, b, ind))?, t0, dy, k })
            }
            None => None,
        };
        Ok(LossBatch { x, y, grad })
    }
}

/// Everything one training call changes in an ensemble (parameters, scaler,
/// elites, optimiser state), copied, so an interrupted call can be undone.
#[derive(Clone)]
pub struct TrainingSnapshot {
    ensemble: EnsembleSnapshot,
    opt: Option<OptimizerState>,
}

/// The training loop shared by both ensembles.
pub(crate) fn train_core(
    ens: &mut ProbabilisticEnsemble,
    opt: &mut Option<ModelOptimizer>,
    data: &TransitionData,
    grad_cfg: Option<&GradientLossConfig>,
    rng: &mut impl Rng,
    interrupt: Option<&AtomicBool>,
    on_epoch: &mut dyn FnMut(&ProbabilisticEnsemble, &EpochStats) -> Result<()>,
) -> Result<TrainReport> {
    let (obs_dim, act_dim) = (ens.obs_dim, ens.act_dim);
    let n = data.rows(obs_dim, act_dim)?;
    let cfg: EnsembleConfig = ens.cfg.clone();
    let (ind, od, e) = (ens.in_dim(), ens.out_dim(), cfg.ensemble_size);
    let n_hold = ((n as f64 * cfg.holdout_ratio).round() as usize).clamp(1, cfg.max_holdout);
    if n < 2 || n_hold >= n {
        return Err(Error::Data(format!(
            "need at least 2 rows with one left for training, got {n}"
        )));
    }
    // Host columns: raw x = (s, a) and targets (r, s' - s).
    let mut xr = vec![0.0f64; n * ind];
    let mut yd = vec![0.0f64; n * od];
    for r in 0..n {
        for j in 0..obs_dim {
            xr[r * ind + j] = data.obs[r * obs_dim + j] as f64;
            yd[r * od + 1 + j] =
                data.next_obs[r * obs_dim + j] as f64 - data.obs[r * obs_dim + j] as f64;
        }
        for j in 0..act_dim {
            xr[r * ind + obs_dim + j] = data.act[r * act_dim + j] as f64;
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
            mu[j] += xr[r * ind + j];
        }
    }
    mu.iter_mut().for_each(|m| *m /= train.len() as f64);
    for &r in &train {
        for j in 0..ind {
            sd[j] += (xr[r * ind + j] - mu[j]).powi(2);
        }
    }
    sd.iter_mut()
        .for_each(|s| *s = (*s / train.len() as f64).sqrt());
    ens.set_scaler(mu, sd)?;
    let (mu, sd) = (ens.scaler_mean.clone(), ens.scaler_std.clone());
    let xs: Vec<f64> = xr
        .iter()
        .enumerate()
        .map(|(i, v)| (v - mu[i % ind]) / sd[i % ind])
        .collect();

    let (dtype, device) = (ens.dtype, ens.device.clone());
    let gather = |rows: &[usize], src: &[f64], width: usize| -> Vec<f64> {
        let mut v = Vec::with_capacity(rows.len() * width);
        for &r in rows {
            v.extend_from_slice(&src[r * width..(r + 1) * width]);
        }
        v
    };
    let x_hold = host_tensor(gather(hold, &xs, ind), &[n_hold, ind], dtype, &device)?;
    let y_hold = host_tensor(gather(hold, &yd, od), &[n_hold, od], dtype, &device)?;

    // Neighbour set: the newest rows; neighbours searched once per training call.
    let grad = match grad_cfg {
        Some(g) => {
            g.validate()?;
            let ns = n.min(g.neighbour_set);
            if ns <= g.neighbours {
                return Err(Error::Data(format!(
                    "the gradient loss needs more than n = {} rows, got {ns}",
                    g.neighbours
                )));
            }
            let first = n - ns;
            let pts: Vec<f32> = xr[first * ind..].iter().map(|&v| v as f32).collect();
            let table = neighbour_table(&pts, ind, g.neighbours, g.standardise_search)?;
            Some((g.clone(), first, ns, table))
        }
        None => None,
    };

    let vars = ens.vars();
    if opt.is_none() {
        *opt = Some(ModelOptimizer::new(ens)?);
    }
    let device_rows = if ens.device_batches {
        Some(DeviceRows {
            xs: crate::transfer::upload(xs.clone(), &[n, ind], &device)?,
            yd: crate::transfer::upload(yd.clone(), &[n, od], &device)?,
        })
    } else {
        None
    };
    let before = Snapshot::take(&vars)?;
    let mut best = Snapshot::take(&vars)?;
    let mut best_mse = vec![f64::INFINITY; e];
    let mut since = 0usize;
    let mut epoch = 0usize;
    let (mut last_loss, mut last_grad): (f64, Option<f64>);
    let bs = cfg.batch_size;
    let mut gperm: Vec<Vec<usize>> = Vec::new();
    let mut gpos = vec![usize::MAX; e];
    loop {
        epoch += 1;
        let mut idx: Vec<Vec<usize>> = Vec::with_capacity(e);
        for _ in 0..e {
            let mut p = train.clone();
            p.shuffle(rng);
            idx.push(p);
        }
        let nb = grad
            .as_ref()
            .map(|(g, first, ns, table)| (g.neighbours, *first, *ns, table.as_slice()));
        let w = grad.as_ref().map_or(0.0, |g| g.0.weight);
        let optimizer = opt.as_mut().ok_or_else(|| Error::Internal("optimiser missing".into()))?;
        let (loss_sum, grad_sum, batches) = match &device_rows {
            Some(rows) => {
                let epoch_rows = DeviceRows::epoch(&idx, bs, nb, &mut gperm, &mut gpos, rng, &device)?;
                // Sums on the device, read back once at the end of the epoch: a
                // non-finite loss is caught there (the weights before this
                // training call are restored either way).
                let mut sums: Option<(Tensor, Tensor, Option<Tensor>)> = None;
                for i in 0..epoch_rows.spans.len() {
                    // Checked per minibatch: a signal must be answered within seconds
                    // even when one epoch takes a minute.
                    if interrupt.is_some_and(|f| f.load(Ordering::Relaxed)) {
                        return Err(Error::Interrupted);
                    }
                    let batch = rows.minibatch(&epoch_rows, i, e, nb.map(|n| n.0), dtype)?;
                    let terms = ens.loss(&batch, w)?;
                    let total = terms.total.to_dtype(DType::F64)?;
                    let nll = terms.nll.to_dtype(DType::F64)?;
                    let r = terms.grad.as_ref().map(|r| r.to_dtype(DType::F64)).transpose()?;
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
                    optimizer.backward_step(&terms.total)?;
                }
                let (t, n, rs) = sums.ok_or_else(|| Error::Internal("an epoch without minibatches".into()))?;
                let mut parts = vec![t.reshape(1)?, n];
                parts.extend(rs);
                let v = crate::transfer::download_f64(&Tensor::cat(&parts, 0)?)?;
                let (nll, r) = (&v[1..1 + e], v.get(1 + e..));
                if !v[0].is_finite() {
                    let member = (0..e).find(|&m| !nll[m].is_finite() || r.is_some_and(|r| !r[m].is_finite()));
                    before.restore(&vars)?;
                    *opt = None;
                    return Err(Error::NonFinite { member, epoch });
                }
                (v[0], r.map_or(0.0, |r| r.iter().sum::<f64>() / e as f64), epoch_rows.spans.len())
            }
            None => {
                let (mut loss_sum, mut grad_sum, mut batches) = (0.0, 0.0, 0usize);
                let mut lo = 0;
                while lo < train.len() {
                    // Checked per minibatch: a signal must be answered within seconds
                    // even when one epoch takes a minute.
                    if interrupt.is_some_and(|f| f.load(Ordering::Relaxed)) {
                        return Err(Error::Interrupted);
                    }
                    let hi = (lo + bs).min(train.len());
                    let src = BatchRows { xs: &xs, yd: &yd, ind, od };
                    let batch = match dtype {
                        DType::F32 => src.minibatch::<f32>(&idx, lo, hi, nb, &mut gperm, &mut gpos, rng, &device)?,
                        DType::F64 => src.minibatch::<f64>(&idx, lo, hi, nb, &mut gperm, &mut gpos, rng, &device)?,
                        d => return Err(Error::Internal(format!("dtype {d:?}"))),
                    };
                    let terms = ens.loss(&batch, w)?;
                    let total = crate::transfer::download_scalar(&terms.total)?;
                    let rvals = terms.grad.as_ref().map(crate::transfer::download_f64).transpose()?;
                    if !total.is_finite() {
                        let nll = crate::transfer::download_f64(&terms.nll)?;
                        let member = (0..e).find(|&m| {
                            !nll[m].is_finite() || rvals.as_ref().is_some_and(|r| !r[m].is_finite())
                        });
                        before.restore(&vars)?;
                        *opt = None;
                        return Err(Error::NonFinite { member, epoch });
                    }
                    optimizer.backward_step(&terms.total)?;
                    loss_sum += total;
                    if let Some(r) = rvals {
                        grad_sum += r.iter().sum::<f64>() / e as f64;
                    }
                    batches += 1;
                    lo = hi;
                }
                (loss_sum, grad_sum, batches)
            }
        };
        last_loss = loss_sum / batches as f64;
        last_grad = grad.as_ref().map(|_| grad_sum / batches as f64);
        let mse = ens.member_mse(&x_hold, &y_hold)?;
        if mse.iter().any(|v| !v.is_finite()) {
            let member = mse.iter().position(|v| !v.is_finite());
            before.restore(&vars)?;
            *opt = None;
            return Err(Error::NonFinite { member, epoch });
        }
        on_epoch(
            ens,
            &EpochStats {
                epoch,
                holdout_mse: mse.clone(),
                train_loss: last_loss,
                grad_loss: last_grad,
            },
        )?;
        // MBPO's early stopping: a member improves when its holdout loss drops by more
        // than `improvement` relative to its best; its weights are snapshotted then.
        let mut improved = false;
        for m in 0..e {
            let gain = if best_mse[m].is_finite() {
                (best_mse[m] - mse[m]) / best_mse[m]
            } else {
                f64::INFINITY
            };
            if gain > cfg.improvement {
                best_mse[m] = mse[m];
                best.update_member(&vars, e, m)?;
                improved = true;
            }
        }
        if improved {
            best.update_shared(&vars, e)?;
            since = 0;
        } else {
            since += 1;
        }
        if since >= cfg.patience || cfg.max_epochs.is_some_and(|max| epoch >= max) {
            break;
        }
    }
    best.restore(&vars)?;
    let mut order: Vec<usize> = (0..e).collect();
    order.sort_by(|&a, &b| best_mse[a].total_cmp(&best_mse[b]));
    ens.elites = order[..cfg.elites].to_vec();
    Ok(TrainReport {
        epochs: epoch,
        holdout_mse: best_mse,
        train_loss: last_loss,
        grad_loss: last_grad,
    })
}

/// The prediction model: the ensemble trained by Gaussian NLL (section 2).
pub struct PredictionEnsemble {
    core: ProbabilisticEnsemble,
    opt: Option<ModelOptimizer>,
    interrupt: Option<Arc<AtomicBool>>,
}

impl PredictionEnsemble {
    pub fn new(
        obs_dim: usize,
        act_dim: usize,
        cfg: &EnsembleConfig,
        device: &Device,
        dtype: DType,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        Ok(Self {
            core: ProbabilisticEnsemble::new(obs_dim, act_dim, cfg, device, dtype, rng)?,
            opt: None,
            interrupt: None,
        })
    }
    /// Trains on all of `data` with early stopping; restores each member's best weights.
    pub fn train(&mut self, data: &TransitionData, rng: &mut impl Rng) -> Result<TrainReport> {
        train_core(
            &mut self.core,
            &mut self.opt,
            data,
            None,
            rng,
            self.interrupt.as_deref(),
            &mut |_, _| Ok(()),
        )
    }
    /// As [`train`](Self::train), calling `on_epoch` after every epoch's holdout evaluation.
    pub fn train_with(
        &mut self,
        data: &TransitionData,
        rng: &mut impl Rng,
        on_epoch: &mut dyn FnMut(&ProbabilisticEnsemble, &EpochStats) -> Result<()>,
    ) -> Result<TrainReport> {
        train_core(&mut self.core, &mut self.opt, data, None, rng, self.interrupt.as_deref(), on_epoch)
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

/// The gradient model: NLL plus `w * R`, the directional-derivative loss (equation 10).
pub struct GradientEnsemble {
    core: ProbabilisticEnsemble,
    opt: Option<ModelOptimizer>,
    grad: GradientLossConfig,
    interrupt: Option<Arc<AtomicBool>>,
}

impl GradientEnsemble {
    pub fn new(
        obs_dim: usize,
        act_dim: usize,
        cfg: &EnsembleConfig,
        grad: &GradientLossConfig,
        device: &Device,
        dtype: DType,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        grad.validate()?;
        Ok(Self {
            core: ProbabilisticEnsemble::new(obs_dim, act_dim, cfg, device, dtype, rng)?,
            opt: None,
            grad: grad.clone(),
            interrupt: None,
        })
    }
    pub fn gradient_config(&self) -> &GradientLossConfig {
        &self.grad
    }
    /// Trains on all of `data`; neighbours from the newest `neighbour_set` rows.
    pub fn train(&mut self, data: &TransitionData, rng: &mut impl Rng) -> Result<TrainReport> {
        train_core(
            &mut self.core,
            &mut self.opt,
            data,
            Some(&self.grad),
            rng,
            self.interrupt.as_deref(),
            &mut |_, _| Ok(()),
        )
    }
    /// As [`train`](Self::train), calling `on_epoch` after every epoch's holdout evaluation.
    pub fn train_with(
        &mut self,
        data: &TransitionData,
        rng: &mut impl Rng,
        on_epoch: &mut dyn FnMut(&ProbabilisticEnsemble, &EpochStats) -> Result<()>,
    ) -> Result<TrainReport> {
        train_core(
            &mut self.core,
            &mut self.opt,
            data,
            Some(&self.grad),
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
