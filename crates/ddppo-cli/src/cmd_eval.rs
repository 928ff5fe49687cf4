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
    /// Episodes, 1 to 10000 (default: the run's `eval_episodes`; the first
    /// ones are the episodes of the run's own evaluations, same env seeds).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=ddppo_agent::config::MAX_EVAL_EPISODES as u64))]
    episodes: Option<u64>,
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
    // The range is clap's; the run's own value passed validation.
    let episodes = args.episodes.map_or(cfg.eval_episodes, |e| e as usize);
    let Some((_, path)) = Checkpoints::new(&args.run).newest()? else {
        bail!("{} has no complete checkpoint to evaluate", args.run.display());
    };
    let (policy, steps) = load_policy(&cfg, &device, &path)?;
    let factory = ddppo_env::EnvFactory::new(cfg.task()?)?;
    let s = evaluate_policy(&factory, &cfg, policy.snapshot()?, episodes)?;
    let diverged = match s.diverged {
        0 => String::new(),
        n => format!("; {n} cut short by a diverged simulation"),
    };
    say!(
        "{} {} seed {} at {steps} env steps: return {:.1} ± {:.1} over {} episodes (mean length {:.0}{diverged})",
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
