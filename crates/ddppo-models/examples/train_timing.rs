//! Seconds per model-training call at the shapes of a real run, for profiling
//! `ModelEnsemble::train` (`train_ensemble`) (not a test: the numbers depend on the machine and its load).
//!
//! ```text
//! RAYON_NUM_THREADS=1 cargo run -p ddppo-models --release --example train_timing -- \
//!     [shape ...] [--pred-only | --grad-only] [--max-epochs N] [--calls C]
//! ```
//!
//! Shapes: `ip2k` (InvertedPendulum, obs 4, act 1, n = 10, w = 10, N = 2,000),
//! `ip10k` (the same with N = 10,000), `hopper5k` (obs 11, act 3, n = 25,
//! w = 50, N = 5,000) and `ant5k` (obs 27, act 8, n = 5, w = 0.1, N = 5,000); all with E = 7, 4 x 200, batch 256. The data are synthetic
//! trajectories of smooth nonlinear systems of those dimensions (no MuJoCo here),
//! so the epoch counts are indicative; the seconds per epoch are what a run pays.
//! Each call trains a fresh ensemble with a fixed seed; with `--calls C > 1` the
//! later calls continue training the same ensemble on the same data.
use std::time::Instant;

use candle_core::{DType, Device};
use ddppo_models::{EnsembleConfig, GradientLossConfig, ModelEnsemble, TransitionData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Shape {
    name: &'static str,
    obs: usize,
    act: usize,
    neighbours: usize,
    weight: f64,
    rows: usize,
}

const SHAPES: [Shape; 4] = [
    Shape { name: "ip2k", obs: 4, act: 1, neighbours: 10, weight: 10.0, rows: 2_000 },
    Shape { name: "ip10k", obs: 4, act: 1, neighbours: 10, weight: 10.0, rows: 10_000 },
    Shape { name: "hopper5k", obs: 11, act: 3, neighbours: 25, weight: 50.0, rows: 5_000 },
    Shape { name: "ant5k", obs: 27, act: 8, neighbours: 5, weight: 0.1, rows: 5_000 },
];

struct Data {
    obs: Vec<f32>,
    act: Vec<f32>,
    rew: Vec<f32>,
    next: Vec<f32>,
}

/// Episodes of `s' = s + dt (tanh(A s + B a) - 0.1 s + 0.3 sin(s))` with random
/// actions, reset after 1000 steps or when the state leaves a box.
fn synthetic(shape: &Shape, seed: u64) -> Data {
    let (o, a) = (shape.obs, shape.act);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let am: Vec<f64> = (0..o * o).map(|_| rng.random_range(-0.8..0.8)).collect();
    let bm: Vec<f64> = (0..o * a).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut d = Data { obs: Vec::new(), act: Vec::new(), rew: Vec::new(), next: Vec::new() };
    let reset = |rng: &mut ChaCha8Rng| -> Vec<f64> { (0..o).map(|_| rng.random_range(-0.1..0.1)).collect() };
    let mut s = reset(&mut rng);
    let mut t = 0;
    let dt = 0.05;
    for _ in 0..shape.rows {
        let u: Vec<f64> = (0..a).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut s2 = vec![0.0; o];
        for i in 0..o {
            let mut z = 0.0;
            for j in 0..o {
                z += am[i * o + j] * s[j];
            }
            for j in 0..a {
                z += bm[i * a + j] * u[j];
            }
            s2[i] = s[i] + dt * (z.tanh() - 0.1 * s[i] + 0.3 * s[(i + 1) % o].sin());
        }
        let r = 1.0 + s2[0] - 1e-3 * u.iter().map(|v| v * v).sum::<f64>();
        d.obs.extend(s.iter().map(|&v| v as f32));
        d.act.extend(u.iter().map(|&v| v as f32));
        d.rew.push(r as f32);
        d.next.extend(s2.iter().map(|&v| v as f32));
        t += 1;
        s = s2;
        if t == 1000 || s.iter().any(|v| v.abs() > 5.0) {
            s = reset(&mut rng);
            t = 0;
        }
    }
    d
}

/// CPU seconds used by this process so far (on a shared machine a steadier measure
/// than wall time, which also counts waiting for a core).
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() -> ddppo_models::Result<()> {
    ddppo_models::tune_allocator();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut names = Vec::new();
    let (mut pred, mut grad) = (true, true);
    let mut max_epochs = None;
    let mut calls = 1usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--pred-only" => grad = false,
            "--grad-only" => pred = false,
            "--max-epochs" => max_epochs = it.next().and_then(|v| v.parse().ok()),
            "--calls" => calls = it.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            s => names.push(s.to_string()),
        }
    }
    if names.is_empty() {
        names = SHAPES.iter().map(|s| s.name.to_string()).collect();
    }
    println!("RAYON_NUM_THREADS={}", std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into()));
    for name in &names {
        let Some(shape) = SHAPES.iter().find(|s| s.name == name) else {
            eprintln!("unknown shape {name}");
            std::process::exit(2);
        };
        let d = synthetic(shape, 1);
        let data = TransitionData { obs: &d.obs, act: &d.act, rew: &d.rew, next_obs: &d.next };
        let cfg = EnsembleConfig { max_epochs, ..Default::default() };
        let gcfg = GradientLossConfig { neighbours: shape.neighbours, weight: shape.weight, ..Default::default() };
        let report = |kind: &str, call: usize, t: (Instant, f64), epochs: usize, loss: f64| {
            let (wall, cpu) = (t.0.elapsed().as_secs_f64(), cpu_seconds() - t.1);
            println!(
                "{name:9} {kind:4} call {call}: {wall:8.2} s wall {cpu:8.2} s cpu  {epochs:3} epochs  {:7.3} cpu s/epoch  train loss {loss:.6}",
                cpu / epochs as f64
            );
        };
        if pred {
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let mut m = ModelEnsemble::new(shape.obs, shape.act, &cfg, None, &Device::Cpu, DType::F32, &mut rng)?;
            for call in 1..=calls {
                let t = (Instant::now(), cpu_seconds());
                let r = m.train(&data, &mut rng)?;
                report("pred", call, t, r.epochs, r.train_loss);
            }
        }
        if grad {
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let mut m =
                ModelEnsemble::new(shape.obs, shape.act, &cfg, Some(&gcfg), &Device::Cpu, DType::F32, &mut rng)?;
            for call in 1..=calls {
                let t = (Instant::now(), cpu_seconds());
                let r = m.train(&data, &mut rng)?;
                report("grad", call, t, r.epochs, r.train_loss);
            }
        }
    }
    Ok(())
}
