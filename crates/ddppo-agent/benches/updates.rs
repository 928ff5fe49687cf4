//! Time per critic update (equation 12) and per policy update (equation 11,
//! B = 256, H = 3) at Ant's dimensions (obs 27, act 8) with the paper's
//! network sizes (2 x 256 SAC networks, two 7 x 4 x 200 ensembles). The
//! baseline measured in the same run is SAC's policy update on the same
//! batch size: the ratio is the price of back-propagating through the model.
//!
//! `cargo bench -p ddppo-agent --bench updates`

use criterion::{Criterion, criterion_group, criterion_main};
use ddppo_agent::{Agent, AgentConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn agent(task: &str) -> Agent {
    let mut cfg = AgentConfig::preset(task).expect("preset");
    cfg.horizon = 3;
    cfg.batch_size = 256;
    let mut agent = Agent::new(cfg).expect("agent");
    let (od, ad) = (agent.env_buffer.obs_dim(), agent.env_buffer.act_dim());
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    // Healthy-looking random transitions (Ant's termination wants 0.2 <= s[0] <= 1).
    for _ in 0..5000 {
        let mut s: Vec<f32> = (0..od).map(|_| rng.random_range(-0.5..0.5)).collect();
        s[0] = 0.6;
        let a: Vec<f32> = (0..ad).map(|_| rng.random_range(-1.0..1.0)).collect();
        let n: Vec<f32> = s.iter().map(|v| v + 0.01).collect();
        agent.env_buffer.push(&s, &a, 1.0, &n, 1.0, 0.0).expect("push");
        agent.model_buffer.push(&s, &a, 1.0, &n, 1.0, 0.0).expect("push");
    }
    agent
}

fn updates(c: &mut Criterion) {
    // As the `ddppo` binary does: the allocator's settings change these
    // updates' times by a quarter (`ddppo_models::tune_allocator`).
    ddppo_models::tune_allocator();
    let mut g = c.benchmark_group("ant_dims_b256");
    g.sample_size(20);
    let mut a = agent("ant");
    g.bench_function("critic_update", |b| b.iter(|| a.update_critic().expect("critic")));
    g.bench_function("policy_update_sac_baseline", |b| b.iter(|| a.update_policy_sac().expect("sac")));
    g.bench_function("policy_update_ddppo_h3", |b| b.iter(|| a.update_policy_through_model().expect("ddppo")));
    g.finish();
}

criterion_group!(benches, updates);
criterion_main!(benches);
