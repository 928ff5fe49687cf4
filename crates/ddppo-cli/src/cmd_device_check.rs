//! `ddppo device-check --device cuda`: the agreement checks of
//! `ddppo_agent::device_check` (ensemble forward, NLL and gradient-loss
//! gradients, a policy-update gradient, a model-env step, an Adam step), the
//! device against the CPU, one line per check; exit 1 when any fails.

use anyhow::{Result, bail};
use ddppo_agent::device_check;

#[derive(clap::Args)]
pub struct DeviceCheckArgs {
    /// The device compared with the CPU: `cuda`, or `cpu` (then the plain
    /// candle ops other devices run are compared with the fused CPU kernels).
    #[arg(long, default_value = "cuda")]
    device: String,
}

pub fn run(args: DeviceCheckArgs) -> Result<()> {
    let device = crate::device::parse(&args.device)?;
    let checks = device_check::agreement(&device)?;
    for c in &checks {
        say!("{c}");
    }
    let failed: Vec<&str> = checks.iter().filter(|c| !c.passed()).map(|c| c.name).collect();
    if !failed.is_empty() {
        bail!("{} of {} checks failed on {}: {}", failed.len(), checks.len(), args.device, failed.join(", "));
    }
    Ok(())
}
