//! `ddppo config`: prints the resolved config of a run (preset or file, then
//! `--env`/`--variant`/`--seed`, then every `--set`, validated) as the TOML
//! `ddppo train` would write, so that scripts (`cargo xtask ablate --steps`)
//! ask the binary instead of reading the presets themselves.

use anyhow::{Context, Result, bail};
use ddppo_agent::{AgentConfig, Overrides, ValidConfig};
use serde::Deserialize;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct ConfigArgs {
    /// Task (see `ddppo env list`); its preset in configs/ is the base config.
    #[arg(long, required_unless_present = "config")]
    env: Option<String>,
    /// A TOML config file to start from instead of the preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one config key (dotted for tables: model.lr=3e-4; KEY=none unsets an optional one); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// ddppo, no-grad-loss, single-model, double-params, mbpo or sac.
    #[arg(long)]
    variant: Option<String>,
    #[arg(long)]
    seed: Option<u64>,
}

pub fn run(args: ConfigArgs) -> Result<()> {
    let cfg = resolve(args.env.as_deref(), args.config.as_deref(), args.variant.as_deref(), args.seed, &args.sets)?;
    std::io::stdout().lock().write_all(cfg.to_toml()?.as_bytes()).context("writing to stdout")
}

/// The config a run of these arguments trains with: the preset of `env` (or
/// the `config` file), then `env`, `variant`, `seed`, then every `--set`,
/// validated once by the agent crate.
pub fn resolve(
    env: Option<&str>,
    config: Option<&Path>,
    variant: Option<&str>,
    seed: Option<u64>,
    sets: &[String],
) -> Result<ValidConfig> {
    if let Some(env) = env {
        ddppo_env::Task::from_name(env)?;
    }
    let base = match (config, env) {
        (Some(path), _) => read_config_file(path)?,
        (None, Some(env)) => AgentConfig::preset(env)?,
        (None, None) => bail!("give --env NAME or --config FILE"),
    };
    let variant = variant.map(ddppo_agent::Variant::from_name).transpose()?;
    if seed.is_some_and(|seed| i64::try_from(seed).is_err()) {
        bail!("--seed must be below 2^63");
    }
    let overrides = Overrides { task: env.map(str::to_string), variant, seed, sets: sets.to_vec() };
    Ok(base.resolve(&overrides)?)
}

/// A `--config` file as the base of a run: valid TOML that sets at least
/// one key, with known keys of the right types (the values are validated
/// after the overrides).
fn read_config_file(path: &Path) -> Result<AgentConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}", e.message()))
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    // An empty file would silently train the built-in defaults.
    if table.is_empty() {
        bail!("{} sets no key; a config file names at least its `task`", path.display());
    }
    AgentConfig::deserialize(table).map_err(|e| anyhow::anyhow!("invalid config: {}", e.message()))
}
