//! `ddppo train`: resolves the config (preset, file, `--set` overrides),
//! guards the run directory, runs the agent and reports: `metrics.jsonl`,
//! `metrics.csv`, a progress bar on a terminal (plain lines otherwise).

use crate::run_dir::{CONFIG_FILE, METRICS_FILE};
use anyhow::{Context, Result, bail};
use ddppo_agent::{Agent, AgentConfig, Checkpoints, EvalRecord};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const CSV_FILE: &str = "metrics.csv";

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Task (see `ddppo env list`); its preset in configs/ is the base config.
    #[arg(long, required_unless_present_any = ["config", "resume"], conflicts_with = "resume")]
    env: Option<String>,
    /// A TOML config file to start from instead of the preset.
    #[arg(long, conflicts_with = "resume")]
    config: Option<PathBuf>,
    /// Override one config key (dotted for tables: model.lr=3e-4); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with = "resume")]
    sets: Vec<String>,
    /// ddppo, no-grad-loss, single-model, double-params, mbpo or sac.
    #[arg(long, conflicts_with = "resume")]
    variant: Option<String>,
    #[arg(long, conflicts_with = "resume")]
    seed: Option<u64>,
    /// cpu or cuda (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Run directory (created; must not hold another run).
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its newest complete checkpoint.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let device = crate::device::parse(&args.device)?;
    let (mut agent, out) = match &args.resume {
        Some(dir) => match resume(dir, device)? {
            Some(agent) => (agent, dir.clone()),
            None => return Ok(()),
        },
        None => {
            let cfg = resolve_config(&args)?;
            let out = args.out.clone().context("--out is required")?;
            let resolved = cfg.to_toml()?;
            prepare_run_dir(&out, &resolved)?;
            (Agent::with_device(cfg, device)?, out)
        }
    };
    let checkpoints = Checkpoints::new(&out);
    let total = agent.config().total_steps();
    let every = agent.config().checkpoint_every;
    let mut report = Reporter::new(&out, total, agent.env_steps)?;
    if agent.env_steps == 0 {
        report.eval(&agent.evaluate()?)?;
    }
    while agent.env_steps < total {
        if let Some(rec) = agent.step()? {
            report.eval(&rec)?;
        }
        report.step(agent.env_steps);
        // After the step's metrics line, so a resumed run never misses one.
        if every > 0 && agent.env_steps.is_multiple_of(every) && agent.env_steps < total {
            let path = checkpoints.save(&agent)?;
            report.note(&format!("checkpoint {}", path.display()));
        }
    }
    if checkpoints.newest()?.map(|(s, _)| s) != Some(agent.env_steps) {
        let path = checkpoints.save(&agent)?;
        report.note(&format!("checkpoint {}", path.display()));
    }
    report.finish();
    eprintln!("run complete: {}", out.display());
    Ok(())
}

/// Loads the newest complete checkpoint of the run in `dir` and cuts its
/// metrics back to that checkpoint's step (the resumed run writes the later
/// lines again, identically on the CPU). `None` when the run is complete.
fn resume(dir: &Path, device: candle_core::Device) -> Result<Option<Agent>> {
    let config = dir.join(CONFIG_FILE);
    if !config.is_file() {
        bail!("{} is not a run directory (no {CONFIG_FILE}); nothing to resume", dir.display());
    }
    let cfg = AgentConfig::from_file(&config)?;
    let checkpoints = Checkpoints::new(dir);
    let Some((step, path)) = checkpoints.newest()? else {
        bail!(
            "{} has no complete checkpoint to resume from (a run writes one every checkpoint_every = {} env steps into {})",
            dir.display(),
            cfg.checkpoint_every,
            checkpoints.root().display()
        );
    };
    let total = cfg.total_steps();
    let agent = Agent::from_checkpoint(cfg, device, &path)?;
    if step >= total {
        eprintln!("{} is complete ({step} of {total} env steps); nothing to resume", dir.display());
        return Ok(None);
    }
    let dropped = truncate_metrics(dir, step)?;
    eprintln!(
        "resuming {} from {} ({step} of {total} env steps{})",
        dir.display(),
        path.display(),
        if dropped > 0 { format!("; {dropped} later metrics lines will be written again") } else { String::new() }
    );
    Ok(Some(agent))
}

/// Keeps the `metrics.jsonl` lines up to `step` env steps and rewrites
/// `metrics.csv` from them; returns how many lines were dropped.
fn truncate_metrics(dir: &Path, step: usize) -> Result<usize> {
    let path = dir.join(METRICS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut keep = Vec::new();
    let mut dropped = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a metrics record", path.display(), i + 1))?;
        let at = value
            .get("env_steps")
            .and_then(|v| v.as_u64())
            .with_context(|| format!("{}:{}: no env_steps", path.display(), i + 1))?;
        if at as usize <= step {
            keep.push(value);
        } else {
            dropped += 1;
        }
    }
    let mut jsonl = String::new();
    let mut csv = String::new();
    for (i, v) in keep.iter().enumerate() {
        jsonl.push_str(&serde_json::to_string(v)?);
        jsonl.push('\n');
        let (header, row) = crate::run_dir::csv_row(v);
        if i == 0 {
            csv.push_str(&header);
            csv.push('\n');
        }
        csv.push_str(&row);
        csv.push('\n');
    }
    crate::run_dir::write_atomic(&path, jsonl.as_bytes())?;
    crate::run_dir::write_atomic(&dir.join(CSV_FILE), csv.as_bytes())?;
    Ok(dropped)
}

/// Preset (or `--config` file), then `--variant`/`--seed`/`--env`, then every
/// `--set`, then the agent's own validation (unknown keys, ranges).
fn resolve_config(args: &TrainArgs) -> Result<AgentConfig> {
    if let Some(env) = &args.env {
        ddppo_env::Task::from_name(env)?;
    }
    let base = match (&args.config, &args.env) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            parse_table(&text).with_context(|| format!("{} is not valid TOML", path.display()))?
        }
        (None, Some(env)) => parse_table(&AgentConfig::preset(env)?.to_toml()?)?,
        (None, None) => bail!("give --env NAME or --config FILE"),
    };
    let mut table = base;
    if let Some(env) = &args.env {
        table.insert("task".into(), toml::Value::String(env.clone()));
    }
    if let Some(v) = &args.variant {
        ddppo_agent::Variant::from_name(v)?;
        table.insert("variant".into(), toml::Value::String(v.clone()));
    }
    if let Some(seed) = args.seed {
        let seed = i64::try_from(seed).context("--seed must be below 2^63")?;
        table.insert("seed".into(), toml::Value::Integer(seed));
    }
    for kv in &args.sets {
        apply_set(&mut table, kv)?;
    }
    let text = toml::to_string(&table).context("cannot serialise the config")?;
    let cfg: AgentConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config: {}", e.message()))?;
    cfg.validate()?;
    Ok(cfg)
}

fn parse_table(text: &str) -> Result<toml::Table> {
    toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.message()))
}

/// `key=value` or `table.key=value`; the value is read as a TOML value
/// (number, bool, array, quoted string), else taken as a bare string.
fn apply_set(table: &mut toml::Table, kv: &str) -> Result<()> {
    let (key, raw) = kv.split_once('=').with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut parts: Vec<&str> = key.trim().split('.').collect();
    let last = parts.pop().filter(|k| !k.is_empty()).with_context(|| format!("--set {kv}: empty key"))?;
    let mut node = table;
    for p in parts {
        node = node
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .with_context(|| format!("--set {kv}: `{p}` is not a table"))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

/// A new run goes into an absent or empty directory; a directory that holds
/// anything else is never written to.
fn prepare_run_dir(out: &Path, resolved: &str) -> Result<()> {
    if out.exists() {
        if !out.is_dir() {
            bail!("--out {} exists and is not a directory", out.display());
        }
        let config = out.join(CONFIG_FILE);
        if config.exists() {
            let existing = std::fs::read_to_string(&config).unwrap_or_default();
            if existing == resolved {
                bail!(
                    "{} already holds this run; continue it with `ddppo train --resume {}`",
                    out.display(),
                    out.display()
                );
            }
            bail!("{} already holds a different run (its config.toml differs); choose another --out", out.display());
        }
        if std::fs::read_dir(out)?.next().is_some() {
            bail!("--out {} is not empty and holds no run; choose another directory", out.display());
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::run_dir::write_atomic(&out.join(CONFIG_FILE), resolved.as_bytes())
}

/// Writes the metrics files and shows progress.
struct Reporter {
    jsonl: std::fs::File,
    csv: std::fs::File,
    csv_header: bool,
    tb: crate::tensorboard::EventWriter,
    bar: Option<ProgressBar>,
    total: usize,
    started: Instant,
    start_steps: usize,
    last_return: Option<f64>,
    last_line: Instant,
}

impl Reporter {
    fn new(dir: &Path, total: usize, start_steps: usize) -> Result<Self> {
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .with_context(|| format!("cannot open {}", dir.join(name).display()))
        };
        let csv_header = std::fs::metadata(dir.join(CSV_FILE)).map(|m| m.len() == 0).unwrap_or(true);
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} env steps  {msg}  [{elapsed_precise} < {eta}]")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Ok(Self {
            jsonl: open(METRICS_FILE)?,
            csv: open(CSV_FILE)?,
            csv_header,
            // Rebuilt from the metrics kept so far (a resume has cut them back).
            tb: crate::tensorboard::EventWriter::open(dir)?,
            bar,
            total,
            started: Instant::now(),
            start_steps,
            last_return: None,
            last_line: Instant::now(),
        })
    }

    fn rate(&self, steps: usize) -> f64 {
        (steps.saturating_sub(self.start_steps)) as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    fn step(&mut self, steps: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(steps as u64);
            if steps % 50 == 0 {
                let ret = self.last_return.map(|r| format!("return {r:.1}")).unwrap_or_default();
                bar.set_message(format!("{ret}  {:.0} steps/s", self.rate(steps)));
            }
        }
    }

    fn eval(&mut self, rec: &EvalRecord) -> Result<()> {
        let value = serde_json::to_value(rec)?;
        // Before metrics.jsonl, so every line there has its event already.
        self.tb.write(&value)?;
        writeln!(self.jsonl, "{}", serde_json::to_string(&value)?)?;
        self.jsonl.flush()?;
        let (header, row) = crate::run_dir::csv_row(&value);
        if self.csv_header {
            writeln!(self.csv, "{header}")?;
            self.csv_header = false;
        }
        writeln!(self.csv, "{row}")?;
        self.csv.flush()?;
        self.last_return = Some(rec.return_mean);
        let line = format!(
            "step {}/{}  return {:.1} ± {:.1}  {:.0} steps/s",
            rec.env_steps,
            self.total,
            rec.return_mean,
            rec.return_std,
            self.rate(rec.env_steps)
        );
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
        self.last_line = Instant::now();
        Ok(())
    }

    fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
