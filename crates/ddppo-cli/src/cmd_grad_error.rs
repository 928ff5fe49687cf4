//! `ddppo grad-error`: the gradient-error study of the paper's Figure 2.
use anyhow::Result;

#[derive(clap::Args)]
pub struct GradErrorArgs {}

pub fn run(_args: GradErrorArgs) -> Result<()> {
    anyhow::bail!("not yet implemented")
}
