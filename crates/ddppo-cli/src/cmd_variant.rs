//! `ddppo variant list`: the algorithm variants `--variant` accepts, one name
//! per line, so that scripts (`cargo xtask ablate`) ask the binary instead of
//! keeping a copy of the list.

use anyhow::{Context, Result};
use ddppo_agent::Variant;
use std::io::Write;

#[derive(clap::Args)]
pub struct VariantArgs {
    #[command(subcommand)]
    cmd: VariantCommand,
}

#[derive(clap::Subcommand)]
enum VariantCommand {
    /// Print every variant name, `ddppo` first (ALGORITHM.md section 6 order).
    List,
}

pub fn run(args: VariantArgs) -> Result<()> {
    match args.cmd {
        VariantCommand::List => {
            let mut out = std::io::stdout().lock();
            for v in Variant::ALL {
                writeln!(out, "{}", v.name()).context("writing to stdout")?;
            }
            Ok(())
        }
    }
}
