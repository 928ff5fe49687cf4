//! What the live Jacobian-error diagnostics cost with a preset's sizes: the
//! one-time draw of the held-out set with its true Jacobians, and one
//! ensemble's figures (an evaluation of `ddppo` computes two, the other
//! model variants one). The ensemble is untrained: the cost does not depend
//! on the weights.
//!
//! `RAYON_NUM_THREADS=1 cargo run -p ddppo-agent --example jacobian_cost -- hopper`

use std::time::Instant;

use candle_core::{DType, Device};
use ddppo_agent::AgentConfig;
use ddppo_agent::jacobian_error::JacobianProbe;
use ddppo_env::{EnvFactory, Task};
use ddppo_models::ModelEnsemble;
use rand::SeedableRng;

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let preset = std::env::args().nth(1).ok_or("usage: jacobian_cost <preset>")?;
    let cfg = AgentConfig::preset(&preset)?;
    let task = Task::from_name(&preset)?;
    let factory = EnvFactory::new(task)?;
    let t = Instant::now();
    let probe = JacobianProbe::draw(task, &factory, cfg.jacobian_states, cfg.jacobian_directions, 0, cfg.eval_workers)?;
    let draw = t.elapsed().as_secs_f64();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let ens = ModelEnsemble::new(task.obs_dim(), task.act_dim(), &cfg.model, None, &Device::Cpu, DType::F32, &mut rng)?;
    let t = Instant::now();
    let reps = 3;
    for _ in 0..reps {
        probe.errors(ens.ensemble())?;
    }
    let per = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "{preset}: {} states, {} directions: drawing the set and its true Jacobians {draw:.2} s ({} workers, once per run); \
         one ensemble's figures ({} elites of {} x {}) {per:.3} s",
        probe.len(),
        cfg.jacobian_directions,
        cfg.eval_workers,
        cfg.model.elites,
        cfg.model.hidden_layers,
        cfg.model.hidden,
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
