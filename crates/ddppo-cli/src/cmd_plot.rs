//! `ddppo plot RUN_DIR... --out FILE.svg`: learning curves like the paper's
//! Figure 1, one panel per env, one curve per variant, mean and a ±std band
//! over the seeds (the run directories) that share env and variant.

use crate::chart::{self, Panel, Series};
use crate::run_dir::{self, RunIdentity};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct PlotArgs {
    /// Run directories written by `ddppo train` (each holds metrics.jsonl and config.toml).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Output file (.svg).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: PlotArgs) -> Result<()> {
    // env -> variant -> env_steps -> one evaluation return per seed
    let mut groups: BTreeMap<String, BTreeMap<String, BTreeMap<u64, Vec<f64>>>> = BTreeMap::new();
    for dir in &args.runs {
        let RunIdentity { env, variant, .. } = run_dir::identity(dir)?;
        let records = run_dir::read_metrics(dir)?;
        if records.is_empty() {
            bail!("{}: metrics.jsonl has no evaluation yet", dir.display());
        }
        let curve = groups.entry(env).or_default().entry(variant).or_default();
        for r in records {
            curve.entry(r.env_steps).or_default().push(r.return_mean);
        }
    }
    let panels: Vec<Panel> = groups
        .into_iter()
        .map(|(env, variants)| Panel {
            title: env,
            x_label: "env steps".into(),
            y_label: "evaluation return".into(),
            log_y: false,
            series: variants
                .into_iter()
                .map(|(variant, points)| {
                    let mut s = Series { label: variant, x: vec![], mean: vec![], std: vec![] };
                    for (step, returns) in points {
                        let (m, sd) = chart::mean_std(&returns);
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
