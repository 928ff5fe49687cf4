//! `ddppo table RUN_DIR... [--at STEPS,...]`: a Markdown table of the
//! evaluation return, mean ± std over seeds, per env and variant at fixed
//! env-step counts (by default four evenly spaced evaluation points).
//!
//! `ddppo table --time RUN_DIR... [--at FROM,TO]`: where each run's time went
//! between two evaluations (wall and per-phase seconds), its ratio to the
//! first run's, and whether it computed the same numbers as the first run.

use crate::chart;
use crate::run_dir;
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TableArgs {
    /// Run directories written by `ddppo train`.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Env-step counts for the columns (comma-separated); with --time the
    /// segment FROM,TO.
    #[arg(long, value_delimiter = ',')]
    at: Vec<u64>,
    /// Time instead of returns: per run the wall and per-phase seconds between
    /// the evaluations at FROM and TO (`--at FROM,TO`; default the first and
    /// last evaluation every run has), the ratio of its wall time to the first
    /// run's, and whether every other logged value at FROM and TO equals the
    /// first run's (so that the seconds compare the same work).
    #[arg(long)]
    time: bool,
}

pub fn run(args: TableArgs) -> Result<()> {
    if args.time {
        return time_table(&args);
    }
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

/// Logged keys that measure time, not what was computed.
const TIMING_KEYS: [&str; 2] = ["wall_s", "phase_s"];

type Record = serde_json::Map<String, serde_json::Value>;

/// One run's segment: its records at both ends and the seconds between them.
struct Segment {
    label: String,
    env: String,
    variant: String,
    ends: [Record; 2],
    wall: f64,
    phases: BTreeMap<String, f64>,
    /// Epochs the model trainings in the segment ran (rollout ensemble,
    /// gradient ensemble); `None` where the records do not log them.
    epochs: [Option<u64>; 2],
}

fn time_table(args: &TableArgs) -> Result<()> {
    let mut runs = Vec::new();
    for dir in &args.runs {
        let id = run_dir::identity(dir)?;
        let records = run_dir::read_run_records(dir)?;
        let by_step: BTreeMap<u64, Record> = records
            .into_iter()
            .filter_map(|v| match v {
                serde_json::Value::Object(m) => Some((m.get("env_steps")?.as_u64()?, m)),
                _ => None,
            })
            .collect();
        runs.push((dir, id, by_step));
    }
    let (from, to) = match args.at.as_slice() {
        [] => {
            let mut common: Option<Vec<u64>> = None;
            for (_, _, by_step) in &runs {
                let steps: Vec<u64> = by_step.keys().copied().collect();
                common = Some(match common {
                    None => steps,
                    Some(c) => c.into_iter().filter(|s| by_step.contains_key(s)).collect(),
                });
            }
            match common.as_deref() {
                Some([first, .., last]) => (*first, *last),
                _ => bail!("the runs have fewer than two evaluations in common"),
            }
        }
        [a, b] if a < b => (*a, *b),
        [a, b] => bail!("--time needs --at FROM,TO with FROM < TO, got {a},{b}"),
        other => bail!("--time takes two env-step counts, --at FROM,TO, got {}", other.len()),
    };
    let mut segments = Vec::new();
    for (dir, id, by_step) in runs {
        let at = |step: u64| -> Result<Record> {
            match by_step.get(&step) {
                Some(r) => Ok(r.clone()),
                None => {
                    let range = match (by_step.keys().next(), by_step.keys().next_back()) {
                        (Some(a), Some(b)) => format!("it has {a} to {b}"),
                        _ => "it has none".to_string(),
                    };
                    bail!("{}: no evaluation at {step} env steps ({range})", dir.display())
                }
            }
        };
        let ends = [at(from)?, at(to)?];
        let seconds = |r: &Record, step: u64| -> Result<(f64, BTreeMap<String, f64>)> {
            let wall = r.get("wall_s").and_then(|v| v.as_f64());
            let wall = wall.with_context(|| format!("{}: the record at {step} has no wall_s", dir.display()))?;
            let phases = match r.get("phase_s") {
                Some(serde_json::Value::Object(p)) => {
                    p.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect()
                }
                _ => bail!("{}: the record at {step} has no phase_s", dir.display()),
            };
            Ok((wall, phases))
        };
        let (w0, p0) = seconds(&ends[0], from)?;
        let (w1, p1) = seconds(&ends[1], to)?;
        let phases = p1.iter().map(|(k, v)| (k.clone(), v - p0.get(k).copied().unwrap_or(0.0))).collect();
        // The records after FROM up to TO each sum the trainings since the one before.
        let sum = |key: &str| -> Option<u64> {
            by_step.range(from + 1..=to).map(|(_, r)| r.get(key).and_then(|v| v.as_u64())).sum()
        };
        let epochs = [sum("model_epochs"), sum("grad_model_epochs")];
        let label =
            dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string());
        segments.push(Segment { label, env: id.env, variant: id.variant, ends, wall: w1 - w0, phases, epochs });
    }
    std::io::Write::write_all(&mut std::io::stdout(), render_time(&segments, from, to).as_bytes())?;
    Ok(())
}

/// Phase columns: every phase any run logged, the first run's largest first.
fn phase_columns(segments: &[Segment]) -> Vec<String> {
    let mut names: Vec<String> = segments.iter().flat_map(|s| s.phases.keys().cloned()).collect();
    names.sort();
    names.dedup();
    let first = &segments[0].phases;
    let secs = |n: &String| first.get(n).copied().unwrap_or(0.0);
    names.sort_by(|a, b| secs(b).total_cmp(&secs(a)).then(a.cmp(b)));
    names
}

/// Whether every value both records log, timing aside, is equal: `(compared, differing keys)`.
fn compare(a: &[Record; 2], b: &[Record; 2]) -> (usize, Vec<String>) {
    let mut compared = 0;
    let mut differ = Vec::new();
    for (ra, rb) in a.iter().zip(b) {
        for (k, va) in ra {
            if TIMING_KEYS.contains(&k.as_str()) {
                continue;
            }
            if let Some(vb) = rb.get(k) {
                compared += 1;
                if va != vb && !differ.contains(k) {
                    differ.push(k.clone());
                }
            }
        }
    }
    (compared, differ)
}

fn render_time(segments: &[Segment], from: u64, to: u64) -> String {
    let phases = phase_columns(segments);
    let mut out = format!("Seconds from {from} to {to} env steps.\n\n| run | env | variant | wall s |");
    for p in &phases {
        out += &format!(" {p} s |");
    }
    out +=
        " rest s | model epochs | gradient-model epochs | wall / first | same numbers as first |\n|---|---|---|---:|";
    out += &"---:|".repeat(phases.len() + 4);
    out += "---|\n";
    let first = &segments[0];
    for (i, s) in segments.iter().enumerate() {
        out += &format!("| {} | {} | {} | {:.1} |", s.label, s.env, s.variant, s.wall);
        for p in &phases {
            match s.phases.get(p) {
                Some(v) => out += &format!(" {v:.1} |"),
                None => out += " – |",
            }
        }
        let rest = s.wall - s.phases.values().sum::<f64>();
        let ratio = if first.wall > 0.0 { format!("{:.2}", s.wall / first.wall) } else { "–".to_string() };
        let same = if i == 0 {
            "–".to_string()
        } else {
            match compare(&first.ends, &s.ends) {
                (0, _) => "nothing in common".to_string(),
                (n, d) if d.is_empty() => format!("yes ({n} values)"),
                (_, d) => {
                    let shown: Vec<&str> = d.iter().take(3).map(String::as_str).collect();
                    let more = if d.len() > 3 { ", …" } else { "" };
                    format!("no: {} differ ({}{more})", d.len(), shown.join(", "))
                }
            }
        };
        let [model, grad] = s.epochs.map(|e| e.map_or("–".to_string(), |e| e.to_string()));
        out += &format!(" {rest:.1} | {model} | {grad} | {ratio} | {same} |\n");
    }
    out
}
