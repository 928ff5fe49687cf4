//! `--device cpu|cuda`: no silent CPU fallback when CUDA was asked for.

use anyhow::{Result, bail};
use candle_core::Device;

pub fn parse(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(),
        other => bail!("unknown device `{other}`; valid: cpu, cuda"),
    }
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Device> {
    Device::new_cuda(0).map_err(|e| anyhow::anyhow!("cannot open CUDA device 0: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Device> {
    bail!("this build has no CUDA support; rebuild with `cargo build --release -p ddppo-cli --features cuda`")
}
