//! `ddppo train`: resolves the config (preset, file, `--set` overrides),
//! guards the run directory, runs the agent and reports: `metrics.jsonl`,
//! `metrics.csv`, a progress bar on a terminal (plain lines otherwise).

use crate::run_dir::{CONFIG_FILE, LOCK_FILE, METRICS_FILE, RunLock};
use anyhow::{Context, Result, bail};
use ddppo_agent::{Agent, AgentConfig, Checkpoints, EvalRecord, Observer, ObserverError, ValidConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub const CSV_FILE: &str = "metrics.csv";

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Task (see `ddppo env list`); its preset in configs/ is the base config.
    #[arg(long, required_unless_present_any = ["config", "resume", "from"], conflicts_with_all = ["resume", "from"])]
    env: Option<String>,
    /// A TOML config file to start from instead of the preset.
    #[arg(long, conflicts_with_all = ["resume", "from"])]
    config: Option<PathBuf>,
    /// Override one config key (dotted for tables: model.lr=3e-4; KEY=none unsets an optional one); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with = "resume")]
    sets: Vec<String>,
    /// ddppo, no-grad-loss, single-model, double-params, mbpo or sac.
    #[arg(long, conflicts_with_all = ["resume", "from"])]
    variant: Option<String>,
    #[arg(long, conflicts_with_all = ["resume", "from"])]
    seed: Option<u64>,
    /// cpu or cuda (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Run directory: created for a new run; one that holds this same run
    /// (same resolved config) continues from its newest checkpoint.
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its newest complete checkpoint.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Branch: a new run in --out that starts from another run's checkpoint
    /// (a run directory: its newest; or RUN/checkpoints/step-N) with that
    /// checkpoint's config and the `--set` overrides (say, a speed option
    /// from step N on); the source run is only read.
    #[arg(long, value_name = "RUN_OR_CHECKPOINT", requires = "out")]
    from: Option<PathBuf>,
    /// Seconds to wait for a run directory that another process holds (a
    /// requeued job whose predecessor still writes its last checkpoint).
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    lock_wait: u64,
}

/// Exit code of a run stopped by a signal after writing a complete
/// checkpoint: the same command (or `--resume DIR`) continues it.
pub const EXIT_INTERRUPTED: i32 = 75;

/// The error of a run stopped by SIGTERM, SIGINT or SIGUSR1 (exit code
/// [`EXIT_INTERRUPTED`]).
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted by a signal; the run is checkpointed and resumable")
    }
}

impl std::error::Error for Interrupted {}

pub fn run(args: TrainArgs) -> Result<()> {
    let device = crate::device::parse(&args.device)?;
    // SIGTERM (Slurm's preemption and time limit), SIGINT (Ctrl-C) and
    // SIGUSR1 (`sbatch --signal`) only raise this flag: the loop checkpoints
    // and exits; a second signal raises it again and changes nothing.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGUSR1] {
        signal_hook::flag::register(sig, stop.clone()).context("cannot install the signal handlers")?;
    }
    let stopped = || stop.load(Ordering::Relaxed);
    // Everything is checked before anything is written.
    let (dir, resolved, branch) = match (&args.resume, &args.out) {
        (Some(dir), _) => {
            if !dir.join(CONFIG_FILE).is_file() {
                bail!("{} is not a run directory (no {CONFIG_FILE}); nothing to resume", dir.display());
            }
            (dir.clone(), None, None)
        }
        (None, Some(out)) => {
            let (cfg, branch) = match &args.from {
                Some(from) => {
                    let source = BranchSource::find(from)?;
                    let base = ddppo_agent::checkpoint::checkpoint_config(&source.checkpoint)?;
                    let overrides = ddppo_agent::Overrides { sets: args.sets.clone(), ..Default::default() };
                    let cfg = base.resolve(&overrides)?;
                    // Refused before the run directory is created.
                    ddppo_agent::checkpoint::check_branch(&source.checkpoint, &cfg)?;
                    (cfg, Some(source))
                }
                None => (resolve_config(&args)?, None),
            };
            check_out_dir(out, &cfg)?;
            (out.clone(), Some(cfg), branch)
        }
        (None, None) => bail!("give --out DIR (a new run) or --resume DIR"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let _lock = RunLock::acquire(&dir, Duration::from_secs(args.lock_wait), &stopped)?;
    if stopped() {
        return Err(Interrupted.into());
    }
    let opened = match branch {
        // A branch whose first checkpoint exists is a run like any other.
        Some(source) if Checkpoints::new(&dir).newest()?.is_none() => {
            let cfg = resolved.context("no config to start a branch with")?;
            Some(start_branch(&dir, cfg, device, &source)?)
        }
        _ => open_run(&dir, resolved, device)?,
    };
    let Some(mut agent) = opened else {
        return Ok(());
    };
    agent.set_interrupt(stop.clone());
    let total = agent.config().total_steps();
    let mut report = Reporter::new(&dir, total, agent.env_steps())?;
    agent.train(Some(&Checkpoints::new(&dir)), &mut report).map_err(|e| match e {
        // The reporter's own error, with its cause chain (a closed pipe, a full disk).
        ddppo_agent::Error::Observer(e) => anyhow::Error::from_boxed(e),
        e => e.into(),
    })?;
    report.finish();
    if !agent.finished() {
        report.note(&format!(
            "interrupted at {} of {total} env steps; continue with the same command or `ddppo train --resume {}`",
            agent.env_steps(),
            dir.display()
        ));
        return Err(Interrupted.into());
    }
    note!("run complete: {}", dir.display());
    Ok(())
}

/// The checkpoint a branch starts from, and the run directory that holds it
/// (whose metrics up to the checkpoint the branch copies), if any.
struct BranchSource {
    checkpoint: PathBuf,
    run: Option<PathBuf>,
}

impl BranchSource {
    /// `from` is a run directory (its newest complete checkpoint) or a
    /// checkpoint directory (`RUN/checkpoints/step-N`).
    fn find(from: &Path) -> Result<Self> {
        if from.join(CONFIG_FILE).is_file() {
            let Some((_, checkpoint)) = Checkpoints::new(from).newest()? else {
                bail!("--from {}: the run has no checkpoint yet; nothing to branch from", from.display());
            };
            return Ok(Self { checkpoint, run: Some(from.to_path_buf()) });
        }
        if !from.join("MANIFEST.json").is_file() {
            bail!(
                "--from {} is neither a run directory (no {CONFIG_FILE}) nor a complete checkpoint (no MANIFEST.json)",
                from.display()
            );
        }
        // RUN/checkpoints/step-N: the run's metrics are copied when RUN holds them.
        let run = from.parent().and_then(Path::parent).filter(|r| r.join(CONFIG_FILE).is_file());
        Ok(Self { checkpoint: from.to_path_buf(), run: run.map(Path::to_path_buf) })
    }
}

/// Starts the branch in `dir` (locked, with no checkpoint yet): the agent
/// from the source checkpoint under `cfg`, the source's metrics up to that
/// checkpoint, the config, and at once a checkpoint of its own, so that a
/// branch killed from here on resumes like any run.
fn start_branch(dir: &Path, cfg: ValidConfig, device: candle_core::Device, source: &BranchSource) -> Result<Agent> {
    let changed = ddppo_agent::checkpoint::checkpoint_config(&source.checkpoint)?.differing_keys(&cfg)?;
    let mut agent = Agent::branch_from_checkpoint(cfg.clone(), device, &source.checkpoint)?;
    let step = agent.env_steps();
    if let Some(run) = &source.run {
        copy_metrics(run, dir, Some(step))?;
    }
    crate::run_dir::write_atomic(&dir.join(CONFIG_FILE), cfg.to_toml()?.as_bytes())?;
    Checkpoints::new(dir).save(&mut agent)?;
    note!(
        "branching {} from {} ({step} of {} env steps; {})",
        dir.display(),
        source.checkpoint.display(),
        cfg.total_steps(),
        if changed.is_empty() { "the same config".to_string() } else { format!("changed: {}", changed.join(", ")) }
    );
    Ok(agent)
}

/// A new run goes into an absent or empty directory, or continues the run
/// that a directory already holds; a directory that holds anything else is
/// never written to.
fn check_out_dir(out: &Path, cfg: &ValidConfig) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("--out {} exists and is not a directory", out.display());
    }
    if out.join(CONFIG_FILE).exists() {
        // Checked again under the lock; here so that a refused run does not
        // even create the lock file.
        return same_run(out, cfg).map(|_| ());
    }
    let other = std::fs::read_dir(out)
        .with_context(|| format!("cannot read {}", out.display()))?
        .flatten()
        // A lock file, or a config that a killed run did not finish writing.
        .any(|e| e.file_name() != LOCK_FILE && !e.file_name().to_string_lossy().ends_with(".tmp"));
    if other {
        bail!("--out {} is not empty and holds no run; choose another directory", out.display());
    }
    Ok(())
}

/// The one rule for a run directory, under its lock. Without `config.toml`:
/// a new run of `resolved`. With one: the same run continues, from its newest
/// complete checkpoint (an older one when the newest is unusable) or from
/// step 0 when there is none; a different `resolved` config is refused,
/// naming the keys. `None`: the run is already complete.
fn open_run(dir: &Path, resolved: Option<ValidConfig>, device: candle_core::Device) -> Result<Option<Agent>> {
    let config = dir.join(CONFIG_FILE);
    if !config.exists() {
        let cfg = resolved.context("no config to start a run with")?;
        crate::run_dir::write_atomic(&config, cfg.to_toml()?.as_bytes())?;
        return Ok(Some(Agent::with_device(cfg, device)?));
    }
    let cfg = match &resolved {
        Some(new) => same_run(dir, new)?,
        None => AgentConfig::parse_file(&config)?.validated()?,
    };
    let total = cfg.total_steps();
    let checkpoints = Checkpoints::new(dir);
    let found = checkpoints.list()?;
    let mut agent = None;
    let mut first_error: Option<ddppo_agent::Error> = None;
    for (step, path) in found.iter().rev() {
        match Agent::from_checkpoint(cfg.clone(), device.clone(), path) {
            Ok(a) => {
                if let Some(e) = &first_error {
                    note!("warning: {e}; falling back to the older checkpoint {}", path.display());
                }
                agent = Some((*step, a));
                break;
            }
            // A checkpoint of another config cannot be helped by an older one.
            Err(e @ ddppo_agent::Error::Checkpoint { .. }) if !e.to_string().contains("different config") => {
                first_error.get_or_insert(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let (None, Some(e)) = (&agent, first_error) {
        return Err(e.into());
    }
    let opened = match agent {
        Some((step, agent)) => {
            if agent.finished() {
                note!("{} is complete ({step} of {total} env steps); nothing to resume", dir.display());
                return Ok(None);
            }
            // A checkpoint taken inside step N (an interrupted model
            // training) comes before that step's evaluation line.
            let keep = if agent.is_mid_step() { step.checked_sub(1) } else { Some(step) };
            let dropped = truncate_metrics(dir, keep)?;
            note!(
                "resuming {} from {} ({step} of {total} env steps{})",
                dir.display(),
                checkpoints.root().join(format!("step-{step:010}")).display(),
                if dropped > 0 {
                    format!("; {dropped} later metrics lines will be written again")
                } else {
                    String::new()
                }
            );
            agent
        }
        None => {
            truncate_metrics(dir, None)?;
            note!("{} has no checkpoint yet; starting its run again from step 0", dir.display());
            Agent::with_device(cfg, device)?
        }
    };
    Ok(Some(opened))
}

/// The config of the run in `dir`, which must equal `new` (so it needs no
/// validation of its own); else an error naming the keys that differ.
fn same_run(dir: &Path, new: &ValidConfig) -> Result<ValidConfig> {
    let cfg = AgentConfig::parse_file(&dir.join(CONFIG_FILE))?;
    let keys = cfg.differing_keys(new)?;
    if !keys.is_empty() {
        bail!(
            "{} already holds a different run ({} differ{} from this command's config); choose another --out",
            dir.display(),
            keys.join(", "),
            if keys.len() == 1 { "s" } else { "" }
        );
    }
    Ok(new.clone())
}

/// Keeps the `metrics.jsonl` lines up to `step` env steps (none for `None`),
/// cuts a torn last line (saying so), and rewrites `metrics.csv` from them;
/// returns how many lines were dropped.
fn truncate_metrics(dir: &Path, step: Option<usize>) -> Result<usize> {
    copy_metrics(dir, dir, step)
}

/// Writes the `metrics.jsonl` lines of run directory `from` up to `step` env
/// steps (none for `None`), without a torn last line (saying so), into
/// `to`'s `metrics.jsonl` and `metrics.csv` (replacing them); returns how
/// many lines were left out.
fn copy_metrics(from: &Path, to: &Path, step: Option<usize>) -> Result<usize> {
    let path = from.join(METRICS_FILE);
    let (records, torn) = crate::run_dir::read_records(&path)?;
    if let Some(line) = torn {
        note!("{}:{line}: cutting a torn last line (an interrupted write)", path.display());
    }
    let mut keep = Vec::new();
    let mut dropped = 0;
    for (i, value) in records.into_iter().enumerate() {
        let at = value
            .get("env_steps")
            .and_then(|v| v.as_u64())
            .with_context(|| format!("{}:{}: no env_steps", path.display(), i + 1))?;
        if step.is_some_and(|s| at as usize <= s) {
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
    crate::run_dir::write_atomic(&to.join(METRICS_FILE), jsonl.as_bytes())?;
    crate::run_dir::write_atomic(&to.join(CSV_FILE), csv.as_bytes())?;
    Ok(dropped)
}

/// Preset (or `--config` file), then `--env`/`--variant`/`--seed`, then
/// every `--set`, validated once (the same resolution as `ddppo config`).
fn resolve_config(args: &TrainArgs) -> Result<ValidConfig> {
    let (env, config, variant) = (args.env.as_deref(), args.config.as_deref(), args.variant.as_deref());
    crate::cmd_config::resolve(env, config, variant, args.seed, &args.sets)
}

/// Writes the metrics files and shows progress.
struct Reporter {
    dir: PathBuf,
    jsonl: std::fs::File,
    csv: std::fs::File,
    csv_header: bool,
    tb: crate::tensorboard::EventWriter,
    bar: Option<ProgressBar>,
    total: usize,
    started: Instant,
    start_steps: usize,
    last_return: Option<f64>,
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
            dir: dir.to_path_buf(),
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
        })
    }

    fn rate(&self, steps: usize) -> f64 {
        (steps.saturating_sub(self.start_steps)) as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    fn progress(&mut self, steps: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(steps as u64);
            if steps.is_multiple_of(50) {
                let ret = self.last_return.map(|r| format!("return {r:.1}")).unwrap_or_default();
                bar.set_message(format!("{ret}  {:.0} steps/s", self.rate(steps)));
            }
        }
    }

    fn eval(&mut self, rec: &EvalRecord) -> Result<()> {
        let value = serde_json::to_value(rec)?;
        // Before metrics.jsonl, so every line there has its event already.
        self.tb.write(&value)?;
        crate::run_dir::append_line(&mut self.jsonl, &self.dir.join(METRICS_FILE), &serde_json::to_string(&value)?)?;
        let (header, row) = crate::run_dir::csv_row(&value);
        let row = if self.csv_header { format!("{header}\n{row}") } else { row };
        crate::run_dir::append_line(&mut self.csv, &self.dir.join(CSV_FILE), &row)?;
        self.csv_header = false;
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
            None => note!("{line}"),
        }
        Ok(())
    }

    fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => note!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// What the agent's loop reports goes to the metrics files and the terminal.
impl Observer for Reporter {
    fn on_step(&mut self, env_steps: usize, _total_steps: usize) {
        self.progress(env_steps);
    }
    fn on_eval(&mut self, record: &EvalRecord) -> std::result::Result<(), ObserverError> {
        self.eval(record).map_err(Into::into)
    }
    fn on_checkpoint(&mut self, path: &Path) {
        self.note(&format!("checkpoint {}", path.display()));
    }
    fn on_warning(&mut self, message: &str) {
        self.note(&format!("warning: {message}"));
    }
}
