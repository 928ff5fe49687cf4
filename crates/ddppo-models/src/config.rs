//! Configuration of the ensembles (ALGORITHM.md sections 2 and 3).
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Sizes and training schedule of a probabilistic ensemble (MBPO defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnsembleConfig {
    /// Number of members `E`.
    pub ensemble_size: usize,
    /// Number of elites used for rollouts.
    pub elites: usize,
    /// Units per hidden layer.
    pub hidden: usize,
    /// Number of hidden layers (SiLU after each).
    pub hidden_layers: usize,
    /// L2 coefficient per layer (`hidden_layers + 1` entries), loss `decay_l * sum(W_l^2) / 2`.
    pub weight_decay: Vec<f64>,
    /// Adam learning rate.
    pub lr: f64,
    /// Minibatch size per member.
    pub batch_size: usize,
    /// Fraction of the data held out for early stopping and elite selection.
    pub holdout_ratio: f64,
    /// Cap on the number of held-out rows.
    pub max_holdout: usize,
    /// Epochs without any member improving before training stops.
    pub patience: usize,
    /// Relative holdout improvement that counts as an improvement.
    pub improvement: f64,
    /// Hard cap on epochs per training call (`None`: only early stopping).
    pub max_epochs: Option<usize>,
    /// Cap on the epochs of a warm-started training call (every call after an
    /// ensemble's first, while its Adam state lives); a cold start is exempt
    /// and trains to its early stop (or `max_epochs`). The per-step speed
    /// option: a cold start happens once per run and is where a cap costs the
    /// most (a 5-epoch cold start on 10,000 Hopper rows: holdout MSE 0.0251
    /// against 0.0118, `J v` cosine 0.472 against 0.685), while the warm
    /// trainings, four per 1,000 env steps, are most of the model time.
    pub warm_max_epochs: Option<usize>,
    /// On a cold start (a fresh optimiser: the ensemble's first training, or
    /// the first after a non-finite loss restarted it), epochs without
    /// improvement do not count toward `patience` until learning has begun
    /// (the members' mean holdout MSE 10% below its epoch-1 value,
    /// `COLD_START_DROP`), for at most this many epochs; 0 is MBPO's plain rule.
    /// From the initial weights the holdout MSE can move under 1% per epoch
    /// for the first ~10 epochs of a small `D_env` (16 minibatches per epoch at
    /// 5,000 rows), and the plain rule then stops an ensemble that has not
    /// learnt anything yet (measured on Ant's first training).
    pub cold_start_wait: usize,
    /// Initial value of the learned upper log-variance bound.
    pub max_logvar_init: f64,
    /// Initial value of the learned lower log-variance bound.
    pub min_logvar_init: f64,
    /// Coefficient of `sum(max_logvar) - sum(min_logvar)` in the loss.
    pub logvar_bound_penalty: f64,
}

impl Default for EnsembleConfig {
    fn default() -> Self {
        Self {
            ensemble_size: 7,
            elites: 5,
            hidden: 200,
            hidden_layers: 4,
            weight_decay: vec![2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4],
            lr: 1e-3,
            batch_size: 256,
            holdout_ratio: 0.2,
            max_holdout: 5000,
            patience: 5,
            improvement: 0.01,
            max_epochs: None,
            warm_max_epochs: None,
            cold_start_wait: 50,
            max_logvar_init: 0.5,
            min_logvar_init: -10.0,
            logvar_bound_penalty: 0.01,
        }
    }
}

/// Most members of an ensemble.
pub const MAX_ENSEMBLE_SIZE: usize = 100;
/// Widest hidden layer of an ensemble member.
pub const MAX_HIDDEN: usize = 16_384;
/// Most hidden layers of an ensemble member.
pub const MAX_HIDDEN_LAYERS: usize = 16;
/// Largest minibatch per member.
pub const MAX_BATCH_SIZE: usize = 65_536;
/// Most neighbours `n` per point of the gradient loss.
pub const MAX_NEIGHBOURS: usize = 1_000;
/// Largest neighbour set.
pub const MAX_NEIGHBOUR_SET: usize = 100_000_000;

fn in_range(field: &str, v: usize, lo: usize, hi: usize) -> Result<()> {
    if (lo..=hi).contains(&v) { Ok(()) } else { Err(bad(field, format!("must be in {lo}..={hi}, got {v}"))) }
}

fn bad(field: &str, why: impl Into<String>) -> Error {
    Error::Config { field: field.to_string(), reason: why.into() }
}

impl EnsembleConfig {
    /// Rows held out of `rows` for early stopping and the elites:
    /// `holdout_ratio` of them, rounded, at least 1, at most `max_holdout`.
    pub fn holdout_rows(&self, rows: usize) -> usize {
        ((rows as f64 * self.holdout_ratio).round() as usize).clamp(1, self.max_holdout)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        in_range("ensemble_size", self.ensemble_size, 1, MAX_ENSEMBLE_SIZE)?;
        if self.elites == 0 || self.elites > self.ensemble_size {
            return Err(bad(
                "elites",
                format!("must be in 1..={} (ensemble_size), got {}", self.ensemble_size, self.elites),
            ));
        }
        in_range("hidden", self.hidden, 1, MAX_HIDDEN)?;
        in_range("hidden_layers", self.hidden_layers, 1, MAX_HIDDEN_LAYERS)?;
        if self.weight_decay.len() != self.hidden_layers + 1 {
            return Err(bad(
                "weight_decay",
                format!(
                    "needs hidden_layers + 1 = {} entries, got {}",
                    self.hidden_layers + 1,
                    self.weight_decay.len()
                ),
            ));
        }
        if self.weight_decay.iter().any(|d| !d.is_finite() || *d < 0.0) {
            return Err(bad("weight_decay", "entries must be finite and >= 0"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(bad("lr", format!("must be finite and > 0, got {}", self.lr)));
        }
        in_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)?;
        if !(self.holdout_ratio > 0.0 && self.holdout_ratio < 1.0) {
            return Err(bad("holdout_ratio", format!("must be in (0, 1), got {}", self.holdout_ratio)));
        }
        if self.patience == 0 {
            return Err(bad("patience", "must be at least 1"));
        }
        if self.max_holdout == 0 {
            return Err(bad("max_holdout", "must be at least 1"));
        }
        if !(self.improvement.is_finite() && self.improvement >= 0.0) {
            return Err(bad("improvement", "must be finite and >= 0"));
        }
        if self.max_epochs == Some(0) {
            return Err(bad("max_epochs", "must be at least 1 when given"));
        }
        if self.warm_max_epochs == Some(0) {
            return Err(bad("warm_max_epochs", "must be at least 1 when given"));
        }
        if !(self.max_logvar_init.is_finite()
            && self.min_logvar_init.is_finite()
            && self.min_logvar_init < self.max_logvar_init)
        {
            return Err(bad("min_logvar_init", "bounds must be finite with min < max"));
        }
        if !(self.logvar_bound_penalty.is_finite() && self.logvar_bound_penalty >= 0.0) {
            return Err(bad("logvar_bound_penalty", "must be finite and >= 0"));
        }
        Ok(())
    }
}

/// The directional-derivative loss `w * R` of the gradient model (equations 9 and 10).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GradientLossConfig {
    /// `n`: neighbours per point.
    pub neighbours: usize,
    /// `w`: weight of `R` in the loss. `0` trains a plain NLL model with the same data flow.
    pub weight: f64,
    /// Size of the neighbour set: the newest rows of the data.
    pub neighbour_set: usize,
    /// Search neighbours in standardised input space instead of raw `x` (the reference's choice).
    pub standardise_search: bool,
    /// `m`: neighbours per point in each minibatch, drawn afresh from its `n`
    /// (an unbiased estimate of `R` at `m / n` of the cost); `0` (the default)
    /// uses all `n`. Left out of a written config when 0, so that configs
    /// without the option read and write as before it existed.
    #[serde(skip_serializing_if = "uses_all_neighbours")]
    pub directions_per_step: usize,
}

fn uses_all_neighbours(directions_per_step: &usize) -> bool {
    *directions_per_step == 0
}

impl Default for GradientLossConfig {
    fn default() -> Self {
        Self { neighbours: 5, weight: 0.1, neighbour_set: 10_000, standardise_search: false, directions_per_step: 0 }
    }
}

impl GradientLossConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        in_range("neighbours", self.neighbours, 1, MAX_NEIGHBOURS)?;
        in_range("neighbour_set", self.neighbour_set, 2, MAX_NEIGHBOUR_SET)?;
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return Err(bad("weight", format!("w must be finite and >= 0, got {}", self.weight)));
        }
        if self.neighbour_set <= self.neighbours {
            return Err(bad("neighbour_set", "must be larger than the number of neighbours"));
        }
        if self.directions_per_step > self.neighbours {
            return Err(bad(
                "directions_per_step",
                format!(
                    "must be in 1..={} (neighbours), or 0 for all, got {}",
                    self.neighbours, self.directions_per_step
                ),
            ));
        }
        Ok(())
    }

    /// Neighbours per point in a minibatch: `directions_per_step`, or all `n`.
    pub fn directions(&self) -> usize {
        if self.directions_per_step == 0 { self.neighbours } else { self.directions_per_step }
    }
}
