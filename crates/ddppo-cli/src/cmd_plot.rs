//! `ddppo plot RUN_DIR... --out FILE.svg [--metric COLUMN]`: learning curves
//! like the paper's Figure 1 (or any other metric column, such as the
//! Jacobian errors of Figure 2), one panel per env, one curve per variant,
//! mean and a ±std band over the seeds (the run directories) that share env
//! and variant.

use crate::chart::{self, Panel, Series};
use crate::run_dir::{self, RunIdentity};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run directories written by `ddppo train` (each holds metrics.jsonl and config.toml).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Output file (.svg).
    #[arg(long)]
    out: PathBuf,
    /// The metrics.jsonl column to draw against env steps (nested ones as
    /// `phase_s.critic`), e.g. grad_jacobian_mse_dynamics; evaluations where
    /// it is empty are left out.
    #[arg(long, default_value = "return_mean")]
    metric: String,
    /// A logarithmic y axis (for error metrics).
    #[arg(long)]
    log_y: bool,
    /// Curve names, comma-separated, one per run directory in order, in place
    /// of the variant: runs with the same name are the seeds of one curve
    /// (e.g. two settings of one variant).
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    labels: Vec<String>,
}

pub fn run(args: PlotArgs) -> Result<()> {
    // env -> variant -> env_steps -> one value per seed
    let mut groups: BTreeMap<String, BTreeMap<String, BTreeMap<u64, Vec<f64>>>> = BTreeMap::new();
    let mut columns = std::collections::BTreeSet::new();
    if !args.labels.is_empty() && args.labels.len() != args.runs.len() {
        bail!("--labels names {} curves for {} run directories: give one per run", args.labels.len(), args.runs.len());
    }
    for (i, dir) in args.runs.iter().enumerate() {
        let RunIdentity { env, variant, .. } = run_dir::identity(dir)?;
        let variant = args.labels.get(i).cloned().unwrap_or(variant);
        let points = if args.metric == "return_mean" {
            let records = run_dir::read_metrics(dir)?;
            if records.is_empty() {
                bail!("{}: metrics.jsonl has no evaluation yet", dir.display());
            }
            records.into_iter().map(|r| (r.env_steps, r.return_mean)).collect()
        } else {
            metric_points(dir, &args.metric, &mut columns)?
        };
        if points.is_empty() {
            continue;
        }
        let curve = groups.entry(env).or_default().entry(variant).or_default();
        for (step, value) in points {
            curve.entry(step).or_default().push(value);
        }
    }
    if groups.is_empty() {
        let known: Vec<&str> = columns.iter().map(String::as_str).collect();
        bail!("no run has a value in column `{}`; metrics.jsonl columns: {}", args.metric, known.join(", "));
    }
    let y_label = if args.metric == "return_mean" { "evaluation return".to_string() } else { args.metric.clone() };
    let panels: Vec<Panel> = groups
        .into_iter()
        .map(|(env, variants)| Panel {
            title: env,
            x_label: "env steps".into(),
            y_label: y_label.clone(),
            log_y: args.log_y,
            series: variants
                .into_iter()
                .map(|(variant, points)| {
                    let mut s = Series { label: variant, x: vec![], mean: vec![], std: vec![] };
                    for (step, values) in points {
                        let (m, sd) = chart::mean_std(&values);
                        s.x.push(step as f64);
                        s.mean.push(m);
                        s.std.push(sd);
                    }
                    s
                })
                .collect(),
        })
        .collect();
    chart::write_svg(&args.out, &panels).with_context(|| format!("cannot plot into {}", args.out.display()))?;
    note!("wrote {}", args.out.display());
    Ok(())
}

/// `(env_steps, value)` of every evaluation of the run in `dir` where
/// `metric` (a dotted path into the JSON object) holds a number (a torn last
/// line is skipped with a warning, as for the returns); adds every column
/// seen to `columns` (for the error message of an unknown one).
fn metric_points(
    dir: &Path,
    metric: &str,
    columns: &mut std::collections::BTreeSet<String>,
) -> Result<Vec<(u64, f64)>> {
    let path = dir.join(run_dir::METRICS_FILE);
    let records = run_dir::read_run_records(dir)?;
    let mut out = Vec::new();
    for (i, record) in records.iter().enumerate() {
        let (header, _) = run_dir::csv_row(record);
        columns.extend(header.split(',').map(str::to_string));
        let step = record.get("env_steps").and_then(serde_json::Value::as_u64);
        let value = metric.split('.').try_fold(record, |v, key| v.get(key));
        match (step, value) {
            (None, _) => bail!("{}:{}: not a metrics record (no env_steps)", path.display(), i + 1),
            (Some(_), None | Some(serde_json::Value::Null)) => {}
            (Some(step), Some(v)) => match v.as_f64() {
                Some(x) => out.push((step, x)),
                None => bail!("{}:{}: `{metric}` is not a number: {v}", path.display(), i + 1),
            },
        }
    }
    Ok(out)
}
