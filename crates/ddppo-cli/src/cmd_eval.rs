//! `ddppo eval --run DIR`: the deterministic policy of a run's newest
//! checkpoint on fresh evaluation episodes; prints mean ± std.

use crate::run_dir::CONFIG_FILE;
use anyhow::{Result, bail};
use ddppo_agent::checkpoint::load_policy;
use ddppo_agent::{AgentConfig, Checkpoints, evaluate_policy};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The run directory (`ddppo train --out`).
    #[arg(long)]
    run: PathBuf,
    /// Episodes (default: the run's `eval_episodes`; the first ones are the
    /// episodes of the run's own evaluations, same env seeds).
    #[arg(long)]
    episodes: Option<usize>,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let device = crate::device::parse(&args.device)?;
    let config = args.run.join(CONFIG_FILE);
    if !config.is_file() {
        bail!("{} is not a run directory (no {CONFIG_FILE})", args.run.display());
    }
    let cfg = AgentConfig::from_file(&config)?;
    let episodes = args.episodes.unwrap_or(cfg.eval_episodes);
    if episodes == 0 {
        bail!("--episodes must be at least 1");
    }
    let Some((_, path)) = Checkpoints::new(&args.run).newest()? else {
        bail!("{} has no complete checkpoint to evaluate", args.run.display());
    };
    let (policy, steps) = load_policy(&cfg, &device, &path)?;
    let factory = ddppo_env::EnvFactory::new(cfg.task()?)?;
    let s = evaluate_policy(&factory, &cfg, policy.snapshot()?, episodes)?;
    println!(
        "{} {} seed {} at {steps} env steps: return {:.1} ± {:.1} over {} episodes (mean length {:.0})",
        cfg.task,
        cfg.variant.name(),
        cfg.seed,
        s.return_mean,
        s.return_std,
        s.episodes,
        s.episode_len_mean
    );
    Ok(())
}
