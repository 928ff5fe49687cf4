//! `ddppo table RUN_DIR... [--at STEPS,...]`: a Markdown table of the
//! evaluation return, mean ± std over seeds, per env and variant at fixed
//! env-step counts (by default four evenly spaced evaluation points).

use crate::chart;
use crate::run_dir;
use anyhow::{Result, bail};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TableArgs {
    /// Run directories written by `ddppo train`.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Env-step counts for the columns (comma-separated).
    #[arg(long, value_delimiter = ',')]
    at: Vec<u64>,
}

pub fn run(args: TableArgs) -> Result<()> {
    // (env, variant) -> per run: env_steps -> return
    let mut groups: BTreeMap<(String, String), Vec<BTreeMap<u64, f64>>> = BTreeMap::new();
    for dir in &args.runs {
        let id = run_dir::identity(dir)?;
        let curve = run_dir::read_metrics(dir)?.into_iter().map(|m| (m.env_steps, m.return_mean)).collect();
        groups.entry((id.env, id.variant)).or_default().push(curve);
    }
    let columns = if args.at.is_empty() { default_columns(&groups) } else { args.at.clone() };
    if columns.is_empty() {
        bail!("the runs hold no evaluations yet");
    }
    std::io::Write::write_all(&mut std::io::stdout(), render(&groups, &columns).as_bytes())?;
    Ok(())
}

/// Four evenly spaced evaluation steps up to the last step every run reached.
fn default_columns(groups: &BTreeMap<(String, String), Vec<BTreeMap<u64, f64>>>) -> Vec<u64> {
    let common = groups.values().flatten().filter_map(|c| c.keys().next_back().copied()).min().unwrap_or(0);
    let steps: Vec<u64> = groups
        .values()
        .flatten()
        .next()
        .map(|c| c.keys().copied().filter(|&s| s <= common).collect())
        .unwrap_or_default();
    if steps.len() <= 4 {
        return steps;
    }
    (1..=4).map(|k| steps[k * steps.len() / 4 - 1]).collect()
}

fn render(groups: &BTreeMap<(String, String), Vec<BTreeMap<u64, f64>>>, columns: &[u64]) -> String {
    let mut out = String::from("| env | variant | seeds |");
    for c in columns {
        out += &format!(" {c} steps |");
    }
    out += "\n|---|---|---|";
    out += &"---|".repeat(columns.len());
    out += "\n";
    for ((env, variant), runs) in groups {
        out += &format!("| {env} | {variant} | {} |", runs.len());
        for c in columns {
            let values: Vec<f64> = runs.iter().filter_map(|r| r.get(c).copied()).collect();
            if values.is_empty() {
                out += " – |";
            } else {
                let (m, s) = chart::mean_std(&values);
                let partial = if values.len() < runs.len() { format!(" (n={})", values.len()) } else { String::new() };
                out += &format!(" {m:.1} ± {s:.1}{partial} |");
            }
        }
        out += "\n";
    }
    out
}
