//! The GEMM bound of a model-training epoch (issue 12): how close one epoch
//! of an ensemble's training comes to the time the machine needs for the
//! matrix products alone.
//!
//! An epoch's FLOPs are its matrix products' (`2 m k n` for an `m x k` times
//! `k x n` product), listed per member by [`epoch_products`] from the shapes
//! the CPU path runs ([`crate::fused`]): for each minibatch of `b` training
//! rows, `R` stacked rows go through every layer,
//!
//! - `R = b` for the NLL alone;
//! - `R = b + b (1 + t)` with the directional-derivative loss: the `b`
//!   training rows, `b` neighbour-set points and `t = min(k, in)` tangent
//!   rows per point (`k` directions per point; above `in` the full Jacobian's
//!   `in` unit tangents, then two `k x in` by `in x out` products per point
//!   for `J v` and its backward pass);
//!
//! and per layer `in_l -> out_l` the forward product `R x in_l . in_l x
//! out_l`, the weight gradient `in_l x R . R x out_l` and, except for the
//! first layer (its input is data), the input gradient `R x out_l . out_l x
//! in_l`. The output layer is `hidden -> 2 (1 + obs)` (mean and log-variance).
//! After each epoch the holdout rows go forward once. So, with
//! `P = sum_l in_l out_l`,
//!
//! `FLOPs = E [ sum over minibatches (6 R P - 2 R in_1 h (+ J v)) + 2 n_hold P ]`.
//!
//! Elementwise work (activations, the loss, Adam) and the minibatch
//! assembly are not counted: the bound is what the products alone take.
//! [`time_products`] times exactly those products as plain f32 GEMMs
//! (`gemm`, the kernel candle's matmul uses), the members' products shared
//! evenly over the same number of threads as the training's, each product
//! on one thread.

use std::time::Instant;

use candle_core::{DType, Device};
use rand::Rng;

use crate::{EnsembleConfig, Error, GradientLossConfig, ModelEnsemble, Result, TransitionData};

/// One matrix product `(m x k) . (k x n)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Product {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl Product {
    /// `2 m k n`.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

/// The shape of one ensemble's training data for [`epoch_products`].
#[derive(Clone, Copy, Debug)]
pub struct EpochShape {
    pub obs_dim: usize,
    pub act_dim: usize,
    /// Rows of the data given to the training call (holdout included).
    pub rows: usize,
    /// Directions per point of the directional-derivative loss in each
    /// minibatch (`n`, or `m` with `directions_per_step`); `None`: NLL only.
    pub directions: Option<usize>,
}

/// Every matrix product of one member in one epoch, in the order the epoch runs them.
pub fn epoch_products(cfg: &EnsembleConfig, shape: &EpochShape) -> Result<Vec<Product>> {
    let ind = shape.obs_dim + shape.act_dim;
    let n_hold = cfg.holdout_rows(shape.rows);
    if shape.rows < 2 || n_hold >= shape.rows || cfg.batch_size == 0 || cfg.hidden_layers == 0 {
        return Err(Error::Data(format!("no epoch to count for {} rows", shape.rows)));
    }
    let od = 1 + shape.obs_dim;
    let mut dims = vec![(ind, cfg.hidden)];
    dims.extend((1..cfg.hidden_layers).map(|_| (cfg.hidden, cfg.hidden)));
    dims.push((cfg.hidden, 2 * od));
    let train = shape.rows - n_hold;
    let mut out = Vec::new();
    let mut lo = 0;
    while lo < train {
        let b = cfg.batch_size.min(train - lo);
        lo += b;
        let (rows, jv) = match shape.directions {
            None => (b, None),
            Some(k) => (b + b * (1 + k.min(ind)), (k > ind).then_some(k)),
        };
        for &(i, o) in &dims {
            out.push(Product { m: rows, k: i, n: o });
        }
        // `J v` per point, then (the backward pass begins there) its gradient.
        if let Some(k) = jv {
            out.extend((0..b).map(|_| Product { m: k, k: ind, n: od }));
            out.extend((0..b).map(|_| Product { m: ind, k, n: od }));
        }
        // Backward, last layer first: input gradient (not for the data), weight gradient.
        for (l, &(i, o)) in dims.iter().enumerate().rev() {
            if l > 0 {
                out.push(Product { m: rows, k: o, n: i });
            }
            out.push(Product { m: i, k: rows, n: o });
        }
    }
    for &(i, o) in &dims {
        out.push(Product { m: n_hold, k: i, n: o });
    }
    Ok(out)
}

/// FLOPs of a list of products.
pub fn flops(products: &[Product]) -> f64 {
    products.iter().map(Product::flops).sum()
}

/// Wall seconds of `members` copies of `products` as plain f32 GEMMs on
/// fresh operands, spread evenly over `threads` threads: thread `j` runs the
/// products of the members' share `[members j / t, members (j + 1) / t)`, a
/// member cut by a share's end by rows (as the training shares its members'
/// rows, [`crate::fused`]), each product on one thread; the best of `repeats`
/// timings.
pub fn time_products(products: &[Product], members: usize, threads: usize, repeats: usize) -> f64 {
    let largest = |f: fn(&Product) -> usize| products.iter().map(f).max().unwrap_or(0);
    let (lhs_len, rhs_len, dst_len) = (largest(|p| p.m * p.k), largest(|p| p.k * p.n), largest(|p| p.m * p.n));
    let t = threads.clamp(1, members.max(1));
    // Thread `j`'s products: (member share in units of 1/t) for each member it touches.
    let shares: Vec<Vec<usize>> = (0..t)
        .map(|j| {
            let (lo, hi) = (members * j, members * (j + 1));
            (0..members).map(|q| hi.min((q + 1) * t).saturating_sub(lo.max(q * t))).filter(|&s| s > 0).collect()
        })
        .collect();
    let run = |shares: &[usize]| {
        // Operand values do not change a GEMM's time; 0.5 keeps them normal.
        let lhs = vec![0.5f32; lhs_len];
        let rhs = vec![0.5f32; rhs_len];
        let mut dst = vec![0.0f32; dst_len];
        for &share in shares {
            for p in products {
                let m = (p.m * share).div_ceil(t);
                // SAFETY: the three buffers hold at least m x k, k x n and m x n
                // elements for every product (their lengths are the maxima), all
                // row-major with the strides given; gemm writes only `dst`.
                unsafe {
                    gemm::gemm(
                        m,
                        p.n,
                        p.k,
                        dst.as_mut_ptr(),
                        1,
                        p.n as isize,
                        false,
                        lhs.as_ptr(),
                        1,
                        p.k as isize,
                        rhs.as_ptr(),
                        1,
                        p.n as isize,
                        0.0f32,
                        1.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        }
        std::hint::black_box(&dst);
    };
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        std::thread::scope(|s| {
            let mut shares = shares.iter();
            let own = shares.next();
            let handles: Vec<_> = shares.map(|sh| s.spawn(move || run(sh))).collect();
            if let Some(sh) = own {
                run(sh);
            }
            for h in handles {
                if let Err(panic) = h.join() {
                    std::panic::resume_unwind(panic);
                }
            }
        });
        best = best.min(start.elapsed().as_secs_f64());
    }
    best
}

/// One ensemble's training epoch against the GEMM bound of its products.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochBound {
    /// Rows of the data (holdout included).
    pub rows: usize,
    /// FLOPs of one epoch's products, all members ([`epoch_products`]).
    pub flops: f64,
    /// Median wall seconds of the measured epochs (the first left out: it
    /// follows the call's set-up).
    pub epoch_s: f64,
    /// Wall seconds of the same products as plain GEMMs ([`time_products`]).
    pub gemm_s: f64,
    /// Threads the members were spread over, in both.
    pub threads: usize,
}

impl EpochBound {
    /// Epoch seconds over GEMM seconds (1 = at the bound).
    pub fn ratio(&self) -> f64 {
        self.epoch_s / self.gemm_s
    }
}

/// Trains a fresh ensemble of `cfg` (with `derivative_loss`, if given) for
/// `epochs` epochs (at least 3) on `data`, times its epochs after the first,
/// and times the same epoch's products as plain GEMMs on the ensemble's
/// threads (`DDPPO_MODEL_THREADS`).
pub fn measure(
    obs_dim: usize,
    act_dim: usize,
    cfg: &EnsembleConfig,
    derivative_loss: Option<&GradientLossConfig>,
    data: &TransitionData,
    epochs: usize,
    rng: &mut impl Rng,
) -> Result<EpochBound> {
    if epochs < 3 {
        return Err(Error::Config { field: "epochs".into(), reason: format!("need at least 3, got {epochs}") });
    }
    let rows = data.rows(obs_dim, act_dim)?;
    let shape = EpochShape { obs_dim, act_dim, rows, directions: derivative_loss.map(GradientLossConfig::directions) };
    let products = epoch_products(cfg, &shape)?;
    let capped = EnsembleConfig { max_epochs: Some(epochs), ..cfg.clone() };
    let mut ens = ModelEnsemble::new(obs_dim, act_dim, &capped, derivative_loss, &Device::Cpu, DType::F32, rng)?;
    let threads = ens.ensemble().threads();
    let mut ends = Vec::with_capacity(epochs);
    ens.train_with(data, rng, &mut |_, _| {
        ends.push(Instant::now());
        Ok(())
    })?;
    let mut spans: Vec<f64> = ends.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    if spans.is_empty() {
        return Err(Error::Internal(format!("{} epochs run, 2 needed", ends.len())));
    }
    spans.sort_by(f64::total_cmp);
    let epoch_s = spans[spans.len() / 2];
    let members = cfg.ensemble_size;
    let gemm_s = time_products(&products, members, threads, 3);
    Ok(EpochBound { rows, flops: members as f64 * flops(&products), epoch_s, gemm_s, threads })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> EnsembleConfig {
        EnsembleConfig {
            hidden: 4,
            hidden_layers: 2,
            batch_size: 4,
            holdout_ratio: 0.2,
            max_holdout: 100,
            weight_decay: vec![0.0; 3],
            ..EnsembleConfig::default()
        }
    }

    #[test]
    fn the_flop_count_matches_a_hand_count() {
        // obs 2, act 1: in 3, hidden 4 (2 layers), out 2 (1 + 2) = 6 columns.
        // 15 rows: 3 held out, 12 trained in minibatches of 4, 4, 4.
        // P = 3*4 + 4*4 + 4*6 = 52; first layer in*h = 12.
        let cfg = tiny();
        let nll = EpochShape { obs_dim: 2, act_dim: 1, rows: 15, directions: None };
        // per minibatch: 6 R P - 2 R 12 with R = 4: 1248 - 96 = 1152; three of them,
        // plus the holdout forward 2 * 3 * 52 = 312.
        assert_eq!(flops(&epoch_products(&cfg, &nll).unwrap()), 3.0 * 1152.0 + 312.0);
        // k = 2 <= in: R = 4 + 4 * 3 = 16.
        let two = EpochShape { directions: Some(2), ..nll };
        assert_eq!(flops(&epoch_products(&cfg, &two).unwrap()), 3.0 * (6.0 * 16.0 * 52.0 - 2.0 * 16.0 * 12.0) + 312.0);
        // k = 5 > in: R = 4 + 4 * 4 = 20, plus per point two products of
        // 2 * 5 * 3 * 3 = 90 FLOPs each.
        let five = EpochShape { directions: Some(5), ..nll };
        let per_batch = 6.0 * 20.0 * 52.0 - 2.0 * 20.0 * 12.0 + 4.0 * 2.0 * 90.0;
        assert_eq!(flops(&epoch_products(&cfg, &five).unwrap()), 3.0 * per_batch + 312.0);
    }

    #[test]
    fn a_partial_last_minibatch_counts_its_own_rows() {
        // 11 rows: 2 held out, 9 trained as 4, 4, 1.
        let cfg = tiny();
        let shape = EpochShape { obs_dim: 2, act_dim: 1, rows: 11, directions: None };
        let per_row = 6.0 * 52.0 - 2.0 * 12.0;
        assert_eq!(flops(&epoch_products(&cfg, &shape).unwrap()), 9.0 * per_row + 2.0 * 2.0 * 52.0);
    }

    #[test]
    fn too_few_rows_is_an_error() {
        let shape = EpochShape { obs_dim: 2, act_dim: 1, rows: 1, directions: None };
        assert!(epoch_products(&tiny(), &shape).is_err());
    }

    #[test]
    fn products_are_timed_for_any_thread_count() {
        let p = vec![Product { m: 64, k: 20, n: 30 }; 3];
        for threads in [1, 2, 5] {
            let s = time_products(&p, 3, threads, 2);
            assert!(s.is_finite() && s > 0.0, "{threads} threads: {s} s");
        }
    }
}
