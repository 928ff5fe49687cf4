//! `ddppo env list` and `ddppo env replay`.
use anyhow::Result;

#[derive(clap::Args)]
pub struct EnvArgs {}

pub fn run(_args: EnvArgs) -> Result<()> {
    anyhow::bail!("not yet implemented")
}
