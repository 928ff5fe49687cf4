//! `ddppo profile`: what one env step of a preset costs at a given size of
//! `D_env`, phase by phase, timed on the agent's own calls, and the seconds
//! per 1,000 env steps that follow from the preset's schedule.

use anyhow::{Context, Result, bail};
use ddppo_agent::profile::{
    critic_updates_per_step, epoch_bounds, last_model_training, load_transitions, record_transitions,
};
use ddppo_agent::{Agent, AgentConfig, EvalRecord};
use ddppo_buffer::ReplayBuffer;
use ddppo_models::gemm_bound::EpochBound;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct ProfileArgs {
    /// Task (see `ddppo env list`); its preset in configs/ is profiled
    /// unchanged, but for --variant, --set and --max-epochs.
    #[arg(long)]
    env: String,
    /// Variant (see `ddppo variant list`; default: the preset's).
    #[arg(long)]
    variant: Option<String>,
    /// KEY=VALUE applied to the preset after --variant, as in `ddppo train`
    /// (repeatable; e.g. gradient.directions_per_step=2).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Sizes of D_env to profile at, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "5000,20000,50000")]
    rows: Vec<usize>,
    /// cpu or cuda (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Cap on the epochs of each ensemble in the timed model training (a full
    /// one runs to early stopping, hours at 50,000 rows); the projection is
    /// then a lower bound, marked `>=`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_epochs: Option<u64>,
    /// Env steps whose updates (critic, policy) are timed.
    #[arg(long, value_name = "N", default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    update_steps: u64,
    /// Where the recorded transitions are kept (TASK-seedS.transitions);
    /// later calls reuse them.
    #[arg(long, value_name = "DIR", default_value = ".cache/profile")]
    data_dir: PathBuf,
    /// Also time one model-training epoch of each ensemble against the GEMM
    /// bound of its matrix products (a fresh ensemble trained N epochs, the
    /// first not timed; the products as plain f32 GEMMs on the same threads).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(3..=1000))]
    gemm_bound: Option<u64>,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// The JSON of an earlier profile (e.g. the CPU's, for a GPU run) to
    /// compare the projection with.
    #[arg(long, value_name = "FILE")]
    baseline: Option<PathBuf>,
}

/// The figures of one size of `D_env`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RowProfile {
    /// Transitions in `D_env`.
    pub rows: usize,
    /// Model-rollout length at that many env steps (the preset's schedule).
    pub k: usize,
    /// Rows the rollout pushed into `D_model`.
    pub model_pool: usize,
    /// Epochs of the rollout (prediction) ensemble; 0 for `sac`.
    pub pred_epochs: usize,
    /// Its training call's wall seconds.
    pub pred_s: f64,
    /// Epochs of the separate gradient ensemble, if any.
    pub grad_epochs: Option<usize>,
    /// Its training call's wall seconds (on a thread beside the other).
    pub grad_s: Option<f64>,
    /// Wall seconds of `Agent::train_models` (both ensembles).
    pub model_train_s: f64,
    /// Wall seconds of `Agent::rollout_models`.
    pub rollout_s: f64,
    /// Critic updates in the timed `update_steps` env steps.
    pub critic_updates: usize,
    /// Their wall seconds.
    pub critic_s: f64,
    /// Policy updates in the timed env steps.
    pub policy_updates: usize,
    /// Their wall seconds.
    pub policy_s: f64,
    /// One evaluation's episodes, wall seconds.
    pub eval_s: f64,
    /// One evaluation's Jacobian diagnostics, wall seconds.
    pub diagnostics_s: f64,
    /// An ensemble stopped at `--max-epochs`: the projection is a lower bound.
    pub capped: bool,
    /// Projected seconds per 1,000 env steps (the formula in `--help`).
    pub projected_s_per_1k: f64,
    /// What the timed training produced, measured by the evaluation after it.
    #[serde(default)]
    pub quality: Option<ModelQuality>,
    /// `--gemm-bound`: one epoch of each ensemble against its GEMM bound.
    #[serde(default)]
    pub gemm_bound: Vec<GemmBoundRow>,
}

/// One ensemble's epoch against the GEMM bound of its products
/// (`ddppo_models::gemm_bound`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GemmBoundRow {
    /// `prediction` or `gradient`.
    pub ensemble: String,
    /// Its figures (`rows`, `flops`, `epoch_s`, `gemm_s`, `threads`).
    #[serde(flatten)]
    pub bound: EpochBound,
}

/// The models of the timed training, as the evaluation after it sees them:
/// holdout MSE of each ensemble's elites, their Jacobian error on the run's
/// held-out states (`jacobian_error`), and the action cost they predict at
/// the policy probe's states (`policy_probe`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelQuality {
    /// Mean holdout MSE of the rollout ensemble's elites.
    pub pred_holdout_mse: f64,
    /// The same of the separate gradient ensemble, if any.
    pub grad_holdout_mse: Option<f64>,
    /// The evaluation's record (Jacobian errors, action costs, ...).
    pub evaluation: EvalRecord,
}

/// A whole profile (what `--json` writes and `--baseline` reads).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Profile {
    pub task: String,
    pub variant: String,
    pub device: String,
    pub rayon_threads: String,
    /// `DDPPO_MODEL_THREADS` as set (empty: unset).
    #[serde(default)]
    pub model_threads: String,
    pub update_steps: usize,
    pub max_epochs: Option<usize>,
    /// The --set assignments applied to the preset.
    #[serde(default)]
    pub set: Vec<String>,
    pub model_train_freq: usize,
    pub eval_every: usize,
    pub rows: Vec<RowProfile>,
}

/// Seconds per 1,000 env steps: `1000 / model_train_freq` model trainings
/// and rollouts, `1000` env steps of updates, `1000 / eval_every`
/// evaluations (collecting, well under 1%, is not counted).
pub fn projected_s_per_1k(r: &RowProfile, model_train_freq: usize, eval_every: usize, update_steps: usize) -> f64 {
    let trainings = 1000.0 / model_train_freq as f64;
    let evaluations = 1000.0 / eval_every as f64;
    trainings * (r.model_train_s + r.rollout_s)
        + 1000.0 * (r.critic_s + r.policy_s) / update_steps as f64
        + evaluations * (r.eval_s + r.diagnostics_s)
}

pub fn run(args: ProfileArgs) -> Result<()> {
    let device = crate::device::parse(&args.device)?;
    let mut cfg =
        crate::cmd_config::resolve(Some(&args.env), None, args.variant.as_deref(), None, &args.set)?.into_inner();
    let max_epochs = args.max_epochs.map(|m| m as usize);
    if let Some(m) = max_epochs {
        cfg.model.max_epochs = Some(cfg.model.max_epochs.map_or(m, |p| p.min(m)));
    }
    let update_steps = args.update_steps as usize;
    let mut sizes = args.rows.clone();
    sizes.dedup();
    // Below this the gradient loss has no neighbours to use and the holdout
    // split leaves nothing to train on.
    let least = (cfg.gradient.neighbours + 2).max(10);
    if let Some(bad) = sizes.iter().find(|&&n| n < least || n >= cfg.replay_size) {
        bail!("--rows {bad} is out of range: each size must be in {least}..{} (replay_size)", cfg.replay_size);
    }
    if args.gemm_bound.is_some() && !device.is_cpu() {
        bail!("--gemm-bound times the CPU path; leave out --device {} or --gemm-bound", args.device);
    }
    let baseline = args.baseline.as_deref().map(read_baseline).transpose()?;
    let largest = sizes.iter().copied().max().context("--rows names no size")?;
    let data = transitions(&cfg, largest, &args.data_dir)?;

    let mut profile = Profile {
        task: cfg.task.clone(),
        variant: cfg.variant.name().to_string(),
        device: args.device.clone(),
        rayon_threads: std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
        model_threads: std::env::var("DDPPO_MODEL_THREADS").unwrap_or_default(),
        update_steps,
        max_epochs,
        set: args.set.clone(),
        model_train_freq: cfg.model_train_freq,
        eval_every: cfg.eval_every,
        rows: Vec::new(),
    };
    for &n in &sizes {
        let mut r = profile_rows(&cfg, device.clone(), &data, n, update_steps, max_epochs)?;
        r.projected_s_per_1k = projected_s_per_1k(&r, cfg.model_train_freq, cfg.eval_every, update_steps);
        if let Some(epochs) = args.gemm_bound {
            let mut bounds = Vec::new();
            timed(&format!("rows {n}: {epochs} epochs of each ensemble against the GEMM bound"), || {
                epoch_bounds(&cfg, &data, n, epochs as usize).map(|b| bounds = b)
            })?;
            r.gemm_bound =
                bounds.into_iter().map(|(name, bound)| GemmBoundRow { ensemble: name.to_string(), bound }).collect();
        }
        profile.rows.push(r);
    }
    let spells = ddppo_models::split::contention().spells();
    if spells > 0 {
        eprintln!(
            "the split helpers came late (a busy machine): their parts ran on the calling thread in {spells} spells of {} to {} ms",
            ddppo_models::split::SERIAL_SPELL.as_millis(),
            ddppo_models::split::MAX_SERIAL_SPELL.as_millis()
        );
    }
    say!("{}", table(&profile));
    if let Some(b) = &baseline {
        say!("\n{}", comparison(&profile, b));
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&profile).context("cannot serialise the profile")?;
        crate::run_dir::write_atomic(path, text.as_bytes())?;
    }
    Ok(())
}

/// The recorded transitions (at least `rows` of them) of the preset's task
/// and seed: read from the data directory, or recorded once and saved there.
fn transitions(cfg: &AgentConfig, rows: usize, dir: &Path) -> Result<ReplayBuffer> {
    let path = dir.join(format!("{}-seed{}.transitions", cfg.task, cfg.seed));
    if path.exists() {
        let data = ReplayBuffer::load(&path)
            .with_context(|| format!("cannot read {} (delete it to record again)", path.display()))?;
        if data.len() >= rows {
            note!("reusing {} recorded transitions from {}", data.len(), path.display());
            return Ok(data);
        }
        note!("{} holds {} transitions, {rows} needed: recording again", path.display(), data.len());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    note!("recording {rows} transitions of {} (uniform random actions, seed {})", cfg.task, cfg.seed);
    let data = record_transitions(cfg, rows, &mut |n| note!("  {n} of {rows} transitions"))?;
    data.save(&path).with_context(|| format!("cannot write {}", path.display()))?;
    note!("recorded {rows} transitions into {}", path.display());
    Ok(data)
}

/// Times the phases of a step on a fresh agent of the preset whose `D_env`
/// holds the first `n` recorded transitions.
fn profile_rows(
    cfg: &AgentConfig,
    device: candle_core::Device,
    data: &ReplayBuffer,
    n: usize,
    update_steps: usize,
    max_epochs: Option<usize>,
) -> Result<RowProfile> {
    let mut agent = Agent::with_device(cfg.clone(), device)?;
    load_transitions(&mut agent, data, n)?;
    let k = cfg.rollout_schedule.length(n / cfg.epoch_length);
    let cap = max_epochs.map_or(String::new(), |m| format!(" (--max-epochs {m})"));
    let model_train_s = timed(&format!("rows {n}: model training{cap}"), || agent.train_models())?;
    let training = last_model_training(&agent);
    let rollout_s = timed(&format!("rows {n}: model rollout of {} rows, k = {k}", cfg.rollout_batch_size), || {
        agent.rollout_models()
    })?;
    let critic_per_step = critic_updates_per_step(cfg);
    let (mut critic_s, mut policy_s) = (0.0, 0.0);
    timed(&format!("rows {n}: updates of {update_steps} env steps"), || -> ddppo_agent::Result<()> {
        for _ in 0..update_steps {
            let t = Instant::now();
            for _ in 0..critic_per_step {
                agent.update_critic()?;
            }
            critic_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            for _ in 0..cfg.policy_updates_per_step {
                agent.update_policy()?;
            }
            policy_s += t.elapsed().as_secs_f64();
        }
        Ok(())
    })?;
    // The first evaluation also draws the Jacobian diagnostics' held-out
    // states, once per run: the second is the one every evaluation costs.
    timed(&format!("rows {n}: first evaluation"), || agent.evaluate().map(drop))?;
    let before = agent.phase_times();
    let mut record = None;
    timed(&format!("rows {n}: evaluation"), || agent.evaluate().map(|r| record = Some(r)))?;
    let after = agent.phase_times();
    let quality = match (training, record) {
        (Some(t), Some(evaluation)) => Some(ModelQuality {
            pred_holdout_mse: t.prediction.holdout_mse,
            grad_holdout_mse: t.gradient.map(|g| g.holdout_mse),
            evaluation,
        }),
        _ => None,
    };
    let (pred, grad) = match training {
        Some(t) => (Some(t.prediction), t.gradient),
        None => (None, None),
    };
    let capped = max_epochs.is_some_and(|m| pred.iter().chain(grad.iter()).any(|e| e.epochs >= m));
    Ok(RowProfile {
        rows: n,
        k,
        model_pool: agent.model_buffer.len(),
        pred_epochs: pred.map_or(0, |e| e.epochs),
        pred_s: pred.map_or(0.0, |e| e.seconds),
        grad_epochs: grad.map(|e| e.epochs),
        grad_s: grad.map(|e| e.seconds),
        model_train_s,
        rollout_s,
        critic_updates: critic_per_step * update_steps,
        critic_s,
        policy_updates: cfg.policy_updates_per_step * update_steps,
        policy_s,
        eval_s: after.eval - before.eval,
        diagnostics_s: after.diagnostics - before.diagnostics,
        capped,
        projected_s_per_1k: 0.0,
        quality,
        gemm_bound: Vec::new(),
    })
}

/// Runs `work`, with a line before it and one every 30 s while it runs (a
/// model training at 50,000 rows takes hours); returns its wall seconds.
fn timed<E>(what: &str, work: impl FnOnce() -> std::result::Result<(), E>) -> Result<f64>
where
    E: std::error::Error + Send + Sync + 'static,
{
    note!("{what} ...");
    let t = Instant::now();
    let (done, wait) = mpsc::channel::<()>();
    let result = std::thread::scope(|scope| {
        scope.spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(Duration::from_secs(30)) {
                note!("  {what}: {:.0} s so far", t.elapsed().as_secs_f64());
            }
        });
        let r = work();
        drop(done);
        r
    });
    result?;
    let s = t.elapsed().as_secs_f64();
    note!("  {what}: {s:.1} s");
    Ok(s)
}

fn read_baseline(path: &Path) -> Result<Profile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read --baseline {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("--baseline {} is not the JSON of `ddppo profile --json`", path.display()))
}

fn epochs_cell(epochs: Option<usize>, seconds: Option<f64>) -> (String, String) {
    match (epochs, seconds) {
        (Some(e), Some(s)) if e > 0 => (e.to_string(), format!("{:.3}", s / e as f64)),
        _ => ("-".into(), "-".into()),
    }
}

/// The figures as a Markdown table.
pub fn table(p: &Profile) -> String {
    let mut out = format!(
        "ddppo profile: {} ({} preset), device {}, RAYON_NUM_THREADS={}, DDPPO_MODEL_THREADS={}, \
         updates of {} env steps{}{}\n\n",
        p.task,
        p.variant,
        p.device,
        or_unset(&p.rayon_threads),
        or_unset(&p.model_threads),
        p.update_steps,
        p.max_epochs.map_or(String::new(), |m| format!(", --max-epochs {m}")),
        p.set.iter().map(|a| format!(", --set {a}")).collect::<String>(),
    );
    out.push_str(
        "| rows | k | pred epochs | pred s/epoch | grad epochs | grad s/epoch | train s | rollout s \
         | critic s/step | policy s/step | eval s | projected s/1k steps |\n",
    );
    out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &p.rows {
        let (pe, ps) = epochs_cell((r.pred_epochs > 0).then_some(r.pred_epochs), Some(r.pred_s));
        let (ge, gs) = epochs_cell(r.grad_epochs, r.grad_s);
        let steps = p.update_steps as f64;
        out.push_str(&format!(
            "| {} | {} | {pe} | {ps} | {ge} | {gs} | {:.2} | {:.2} | {:.4} | {:.4} | {:.2} | {}{:.1} |\n",
            r.rows,
            r.k,
            r.model_train_s,
            r.rollout_s,
            r.critic_s / steps,
            r.policy_s / steps,
            r.eval_s + r.diagnostics_s,
            if r.capped { ">=" } else { "" },
            r.projected_s_per_1k,
        ));
    }
    out.push_str(&format!(
        "\nprojected s/1k steps = {} x (train s + rollout s) + 1000 x (critic s/step + policy s/step) + {} x eval s",
        fmt_ratio(1000.0 / p.model_train_freq as f64),
        fmt_ratio(1000.0 / p.eval_every as f64),
    ));
    if p.rows.iter().any(|r| r.quality.is_some()) {
        out.push_str(&format!("\n\n{}", quality_table(p)));
    }
    if p.rows.iter().any(|r| !r.gemm_bound.is_empty()) {
        out.push_str(&format!("\n\n{}", gemm_bound_table(p)));
    }
    out
}

/// `--gemm-bound`: each ensemble's epoch against the GEMM bound of its products.
fn gemm_bound_table(p: &Profile) -> String {
    let mut out = String::from(
        "| rows | ensemble | threads | GFLOP/epoch | epoch s | GEMM s | epoch / GEMM | GFLOP/s epoch | GFLOP/s GEMM |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &p.rows {
        for GemmBoundRow { ensemble, bound: g } in &r.gemm_bound {
            let gflop = g.flops / 1e9;
            out.push_str(&format!(
                "| {} | {} | {} | {gflop:.1} | {:.3} | {:.3} | {:.2} | {:.1} | {:.1} |\n",
                r.rows,
                ensemble,
                g.threads,
                g.epoch_s,
                g.gemm_s,
                g.ratio(),
                gflop / g.epoch_s,
                gflop / g.gemm_s,
            ));
        }
    }
    out.push_str(
        "\nGFLOP/epoch: the epoch's matrix products, 2 m k n each (forward, weight and input gradients of every \
         layer for the minibatches' stacked rows, the holdout forward); GEMM s: those products as plain f32 GEMMs, \
         members spread over the same threads",
    );
    out
}

fn cell(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.4}"))
}

/// The trained models' figures: holdout MSE, Jacobian error (reward-row and
/// dynamics-row MSE, mean cosine of `J v`) per ensemble, action cost.
fn quality_table(p: &Profile) -> String {
    let mut out = String::from(
        "| rows | ensemble | holdout MSE | Jacobian MSE reward | Jacobian MSE dynamics | Jacobian cos \
         | dr/da cos | action cost (true) | action cost (model) |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &p.rows {
        let Some(q) = &r.quality else { continue };
        let e = &q.evaluation;
        let mut row = |ensemble: &str, figures: [Option<f64>; 7]| {
            let cells: Vec<String> = figures.into_iter().map(cell).collect();
            out.push_str(&format!("| {} | {ensemble} | {} |\n", r.rows, cells.join(" | ")));
        };
        row(
            "prediction",
            [
                Some(q.pred_holdout_mse),
                e.pred_jacobian_mse_reward,
                e.pred_jacobian_mse_dynamics,
                e.pred_jacobian_cos,
                e.pred_jacobian_cos_reward_action,
                e.action_cost_true,
                e.action_cost_pred,
            ],
        );
        if q.grad_holdout_mse.is_some() {
            row(
                "gradient",
                [
                    q.grad_holdout_mse,
                    e.grad_jacobian_mse_reward,
                    e.grad_jacobian_mse_dynamics,
                    e.grad_jacobian_cos,
                    e.grad_jacobian_cos_reward_action,
                    e.action_cost_true,
                    e.action_cost_grad,
                ],
            );
        }
    }
    out
}

fn or_unset(v: &str) -> &str {
    if v.is_empty() { "unset" } else { v }
}

fn fmt_ratio(v: f64) -> String {
    if v.fract() == 0.0 { format!("{v:.0}") } else { format!("{v:.3}") }
}

/// This profile's projection beside a baseline's, row size by row size.
fn comparison(p: &Profile, b: &Profile) -> String {
    let mut out = format!(
        "| rows | projected s/1k steps ({}) | projected s/1k steps ({}, baseline) | ratio |\n|---:|---:|---:|---:|\n",
        p.device, b.device
    );
    for r in &p.rows {
        let base = b.rows.iter().find(|x| x.rows == r.rows && b.task == p.task);
        let (bs, ratio) = match base {
            Some(x) => {
                (format!("{:.1}", x.projected_s_per_1k), format!("{:.3}", r.projected_s_per_1k / x.projected_s_per_1k))
            }
            None => ("-".into(), "-".into()),
        };
        out.push_str(&format!("| {} | {:.1} | {bs} | {ratio} |\n", r.rows, r.projected_s_per_1k));
    }
    out
}
