//! The files of a run directory, as `ddppo train` writes them:
//!
//! - `config.toml`: the resolved config; its top-level `env`, `variant` and
//!   `seed` keys identify the run;
//! - `metrics.jsonl`: one JSON object per evaluation (see [`Metrics`]);
//! - `metrics.csv`: the same records as CSV;
//! - `checkpoints/`: the newest complete checkpoint and the one before it.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One evaluation, one line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    pub env_steps: u64,
    pub return_mean: f64,
    pub return_std: f64,
    pub wall_s: f64,
    #[serde(default)]
    pub model_loss: Option<f64>,
    #[serde(default)]
    pub grad_model_loss: Option<f64>,
    #[serde(default)]
    pub critic_loss: Option<f64>,
    #[serde(default)]
    pub policy_loss: Option<f64>,
    #[serde(default)]
    pub alpha: Option<f64>,
}

/// What identifies a run among others in a plot or an ablation table.
#[derive(Debug, Clone, PartialEq)]
pub struct RunIdentity {
    pub env: String,
    pub variant: String,
    pub seed: u64,
}

pub fn identity(dir: &Path) -> Result<RunIdentity> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} is not a run directory (no readable {CONFIG_FILE})", dir.display()))?;
    let value: toml::Table = toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let string = |key: &str| -> Result<String> {
        value
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .with_context(|| format!("{} has no string key `{key}`", path.display()))
    };
    let seed = value
        .get("seed")
        .and_then(|v| v.as_integer())
        .and_then(|s| u64::try_from(s).ok())
        .with_context(|| format!("{} has no non-negative integer key `seed`", path.display()))?;
    Ok(RunIdentity { env: string("env")?, variant: string("variant")?, seed })
}

pub fn read_metrics(dir: &Path) -> Result<Vec<Metrics>> {
    let path = dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let m: Metrics =
            serde_json::from_str(line).with_context(|| format!("{}:{}: not a metrics record", path.display(), i + 1))?;
        if !m.return_mean.is_finite() {
            bail!("{}:{}: return_mean is not finite", path.display(), i + 1);
        }
        out.push(m);
    }
    Ok(out)
}
