//! `ddppo checkpoint latest RUN`: the path of a run's newest complete
//! checkpoint, so that scripts (xtask's tests) need not know how
//! checkpoints are named. `ddppo checkpoint evaluate CHECKPOINT`: the
//! evaluation record of a checkpoint with every diagnostic of the current
//! binary, for checkpoints of runs that predate a diagnostic.

use crate::run_dir::CONFIG_FILE;
use anyhow::{Context, Result, bail};
use ddppo_agent::{Agent, AgentConfig, Checkpoints};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CheckpointArgs {
    #[command(subcommand)]
    cmd: CheckpointCommand,
}

#[derive(clap::Subcommand)]
enum CheckpointCommand {
    /// Print the newest complete checkpoint of a run directory (an error when it has none).
    Latest {
        /// The run directory (`ddppo train --out`).
        run: PathBuf,
    },
    /// Load a checkpoint whole and print its evaluation record as one JSON
    /// line (the keys of metrics.jsonl, every diagnostic included; wall_s and
    /// phase_s are this command's). The run's config.toml is read from the
    /// checkpoint's run directory; the run directory is not written.
    Evaluate {
        /// A checkpoint directory (RUN/checkpoints/step-N).
        checkpoint: PathBuf,
        /// cpu or cuda.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

pub fn run(args: CheckpointArgs) -> Result<()> {
    match args.cmd {
        CheckpointCommand::Latest { run } => {
            if !run.is_dir() {
                bail!("{} is not a directory", run.display());
            }
            let Some((_, path)) = Checkpoints::new(&run).newest()? else {
                bail!("{} has no complete checkpoint", run.display());
            };
            writeln!(std::io::stdout().lock(), "{}", path.display()).context("writing to stdout")
        }
        CheckpointCommand::Evaluate { checkpoint, device } => {
            let device = crate::device::parse(&device)?;
            if !checkpoint.is_dir() {
                bail!("{} is not a checkpoint directory", checkpoint.display());
            }
            let run = checkpoint.parent().and_then(|p| p.parent()).map(|r| r.join(CONFIG_FILE));
            let Some(config) = run.filter(|c| c.is_file()) else {
                bail!("{} is not inside a run directory (no ../../{CONFIG_FILE})", checkpoint.display());
            };
            let cfg = AgentConfig::from_file(&config)?;
            let mut agent = Agent::from_checkpoint(cfg, device, &checkpoint)?;
            let record = agent.evaluate()?;
            let line = serde_json::to_string(&record)?;
            writeln!(std::io::stdout().lock(), "{line}").context("writing to stdout")
        }
    }
}
