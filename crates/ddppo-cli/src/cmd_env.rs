//! `ddppo env list`, `ddppo env replay` and `ddppo env jacobian`.
use anyhow::{Context, Result};
use ddppo_env::replay::{ReplayInput, replay};
use ddppo_env::{JacobianInput, Task};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct EnvArgs {
    #[command(subcommand)]
    cmd: EnvCommand,
}

#[derive(clap::Subcommand)]
enum EnvCommand {
    /// List the environments with their observation and action sizes.
    List,
    /// Apply recorded actions from a given state; print one JSON line per step
    /// and stop after the first termination.
    Replay {
        /// Environment name (see `ddppo env list`).
        #[arg(long)]
        env: String,
        /// JSON file: {"qpos": [...], "qvel": [...], "actions": [[...], ...]}
        /// for MuJoCo tasks, {"state": [...], "actions": [...]} for pendulum and linear.
        #[arg(long)]
        input: PathBuf,
    },
    /// The true Jacobian d(r, obs')/d(obs, a) of one env step at each given
    /// point (exact for pendulum and linear; central differences through the
    /// MuJoCo step, unobserved x / x-y positions at 0); one JSON line
    /// {"jacobian": [[...], ...]} per point, rows (r, obs'_1..obs'_d),
    /// columns (obs_1..obs_d, a_1..a_m).
    Jacobian {
        /// Environment name (see `ddppo env list`).
        #[arg(long)]
        env: String,
        /// JSON file: a list of {"obs": [...], "action": [...]}.
        #[arg(long)]
        input: PathBuf,
    },
}

pub fn run(args: EnvArgs) -> Result<()> {
    match args.cmd {
        EnvCommand::List => list(),
        EnvCommand::Replay { env, input } => replay_file(&env, &input),
        EnvCommand::Jacobian { env, input } => jacobian_file(&env, &input),
    }
}

fn list() -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<18} {:>4} {:>4}  kind", "name", "obs", "act")?;
    for task in Task::ALL {
        let kind = if task.is_mujoco() { "MuJoCo (v2 semantics)" } else { "analytic (exact Jacobians)" };
        writeln!(out, "{:<18} {:>4} {:>4}  {kind}", task.name(), task.obs_dim(), task.act_dim())?;
    }
    Ok(())
}

fn replay_file(env: &str, path: &std::path::Path) -> Result<()> {
    let task = Task::from_name(env)?;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let input = ReplayInput::from_json(&text).with_context(|| format!("{}", path.display()))?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut write_error = None;
    replay(task, &input, |step| {
        let line = serde_json::json!({
            "obs": step.obs,
            "reward": step.reward,
            "terminated": step.terminated,
            "truncated": step.truncated,
        });
        if write_error.is_none()
            && let Err(e) = writeln!(out, "{line}")
        {
            write_error = Some(e);
        }
    })
    .with_context(|| format!("replaying {} on {task}", path.display()))?;
    if let Some(e) = write_error {
        return Err(e).context("writing to stdout");
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}

fn jacobian_file(env: &str, path: &std::path::Path) -> Result<()> {
    let task = Task::from_name(env)?;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let points = JacobianInput::list_from_json(&text).with_context(|| format!("{}", path.display()))?;
    let jacobians = JacobianInput::jacobians(task, &points)
        .with_context(|| format!("jacobians of {} on {task}", path.display()))?;
    let cols = task.obs_dim() + task.act_dim();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for jac in jacobians {
        let rows: Vec<&[f64]> = jac.chunks(cols).collect();
        writeln!(out, "{}", serde_json::json!({ "jacobian": rows })).context("writing to stdout")?;
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}
