//! Per-epoch holdout MSE and derivative loss R of one ensemble trained on
//! recorded transitions (`ddppo profile`'s data file), with early stopping
//! off, to see what the stopping rule sees.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p ddppo-agent --example epoch_curve -- ant FILE ROWS EPOCHS [weight] [KEY=VALUE ...]`
//! (weight 0: the prediction ensemble's loss).

use candle_core::{DType, Device};
use ddppo_agent::AgentConfig;
use ddppo_buffer::ReplayBuffer;
use ddppo_models::{ModelEnsemble, TransitionData};
use rand::SeedableRng;

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: epoch_curve <preset> <transitions file> <rows> <epochs> [weight] [KEY=VALUE ...]";
    let (preset, file, rows, epochs) = match &args[1..] {
        [p, f, r, e, ..] => (p.clone(), f.clone(), r.parse::<usize>()?, e.parse::<usize>()?),
        _ => return Err(usage.into()),
    };
    let weight: f64 = args.get(5).map_or(Ok(0.1), |w| w.parse())?;
    let mut cfg = AgentConfig::preset(&preset)?;
    for a in args.iter().skip(6) {
        cfg.set(a)?;
    }
    cfg.model.max_epochs = Some(epochs);
    cfg.model.patience = 1_000_000;
    cfg.gradient.weight = weight;
    let data = ReplayBuffer::load(std::path::Path::new(&file))?;
    let all = data.newest(data.len());
    let (od, ad) = (data.obs_dim(), data.act_dim());
    let td = TransitionData {
        obs: &all.obs[..rows * od],
        act: &all.act[..rows * ad],
        rew: &all.rew[..rows],
        next_obs: &all.next_obs[..rows * od],
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let loss = (weight > 0.0).then_some(&cfg.gradient);
    let mut ens = ModelEnsemble::new(od, ad, &cfg.model, loss, &Device::Cpu, DType::F32, &mut rng)?;
    println!("epoch,holdout_mean,holdout_min,train_loss,R");
    ens.train_with(&td, &mut rng, &mut |_, s| {
        let mean = s.holdout_mse.iter().sum::<f64>() / s.holdout_mse.len() as f64;
        let min = s.holdout_mse.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "{},{mean:.4},{min:.4},{:.4},{}",
            s.epoch,
            s.train_loss,
            s.derivative_loss.map_or("-".into(), |r| format!("{r:.4}"))
        );
        Ok(())
    })?;
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
