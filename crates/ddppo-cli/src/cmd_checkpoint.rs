//! `ddppo checkpoint latest RUN`: the path of a run's newest complete
//! checkpoint, so that scripts (xtask's tests) need not know how
//! checkpoints are named.

use anyhow::{Context, Result, bail};
use ddppo_agent::Checkpoints;
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
    }
}
