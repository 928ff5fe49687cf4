//! Wall time per env step of a preset once every update runs: warms up to the
//! first model training, then times `N` further steps and prints the phase
//! split and the implied seconds per 1000 env steps.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p ddppo-agent --example step_timing -- inverted-pendulum 100`

use std::time::Instant;

use ddppo_agent::{Agent, AgentConfig};

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let preset = args.next().ok_or("usage: step_timing <preset> [steps]")?;
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(100);
    let mut cfg = AgentConfig::preset(&preset)?;
    cfg.eval_every = usize::MAX / 2;
    let first_training = cfg.min_pool_size.div_ceil(cfg.model_train_freq) * cfg.model_train_freq;
    let mut agent = Agent::new(cfg)?;
    let t = Instant::now();
    while agent.env_steps() < first_training {
        agent.step()?;
    }
    let warm = agent.phase_times();
    eprintln!(
        "reached step {} (first model training) in {:.1} s: {warm:?}",
        agent.env_steps(),
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    for _ in 0..steps {
        agent.step()?;
    }
    let dt = t.elapsed().as_secs_f64();
    let p = agent.phase_times();
    println!(
        "{preset}: {steps} steps in {dt:.1} s = {:.3} s/step = {:.0} s per 1000 env steps (updates only; model training every {} steps adds {:.1} s each); critic {:.3} s/step, policy {:.3} s/step, collect {:.4} s/step",
        dt / steps as f64,
        1000.0 * dt / steps as f64,
        agent.config().model_train_freq,
        warm.model_train + warm.model_rollout,
        (p.critic - warm.critic) / steps as f64,
        (p.policy - warm.policy) / steps as f64,
        (p.collect - warm.collect) / steps as f64,
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
