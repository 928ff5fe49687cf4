//! Wall time of one iteration of Algorithm 1 (`Agent::step`: one env step
//! plus its G1 policy and G2 critic updates) between model trainings, for
//! `ddppo` next to model-free `sac` in the same run, on a small Pendulum
//! config. The ratio is the per-step price of back-propagating through the
//! models; model trainings and evaluations are excluded from the timings.
//!
//!     cargo bench --bench env_step

use criterion::{Criterion, criterion_group, criterion_main};
use ddppo::agent::{Agent, AgentConfig, Variant};
use std::time::{Duration, Instant};

const TRAIN_FREQ: usize = 250;

fn agent(variant: Variant) -> Agent {
    let mut cfg = AgentConfig::preset("pendulum").expect("pendulum preset");
    cfg.variant = variant;
    cfg.epochs = 1000;
    cfg.start_steps = 300;
    cfg.min_pool_size = 300;
    cfg.model_train_freq = TRAIN_FREQ;
    cfg.rollout_batch_size = 2000;
    cfg.eval_every = 1_000_000;
    cfg.model.max_epochs = Some(5);
    let mut agent = Agent::new(cfg).expect("agent");
    // Past the warm-up and the first model training.
    while agent.env_steps < 500 {
        agent.step().expect("step");
    }
    agent
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("agent_step_pendulum");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for variant in [Variant::Sac, Variant::Ddppo] {
        let mut agent = agent(variant);
        group.bench_function(variant.name(), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut timed = 0;
                while timed < iters {
                    let trains = (agent.env_steps + 1).is_multiple_of(TRAIN_FREQ);
                    let t = Instant::now();
                    agent.step().expect("step");
                    if !trains {
                        total += t.elapsed();
                        timed += 1;
                    }
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
