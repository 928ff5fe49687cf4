//! The files of a run directory, as `ddppo train` writes them:
//!
//! - `config.toml`: the resolved config; its top-level `task`, `variant` and
//!   `seed` keys identify the run;
//! - `metrics.jsonl`: one JSON object per evaluation (see [`Metrics`]);
//! - `metrics.csv`: the same records as CSV;
//! - `checkpoints/`: the newest complete checkpoint and the one before it.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::Path;

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";

/// The fields of a `metrics.jsonl` line (an `ddppo_agent::EvalRecord`) that
/// plots and tables read.
#[derive(Debug, Clone, Deserialize)]
pub struct Metrics {
    pub env_steps: u64,
    pub return_mean: f64,
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
    Ok(RunIdentity { env: string("task")?, variant: string("variant")?, seed })
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

/// Writes `bytes` to a temporary name beside `path`, syncs it, and renames it
/// over `path`: a crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// A CSV header and row from a JSON object: nested objects flatten to
/// `outer.inner` columns; `env_steps` and the returns come first.
pub fn csv_row(value: &serde_json::Value) -> (String, String) {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    flatten(&key, v, out);
                }
            }
            serde_json::Value::Null => out.push((prefix.to_string(), String::new())),
            serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut cols = Vec::new();
    flatten("", value, &mut cols);
    const FIRST: [&str; 4] = ["env_steps", "return_mean", "return_std", "wall_s"];
    cols.sort_by_key(|(k, _)| (FIRST.iter().position(|f| f == k).unwrap_or(FIRST.len()), k.clone()));
    let header = cols.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(",");
    let row = cols.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>().join(",");
    (header, row)
}
