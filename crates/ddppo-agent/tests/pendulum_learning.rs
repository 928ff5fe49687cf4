//! End to end: a short run on the analytic Pendulum improves the deterministic
//! evaluation return clearly over a uniformly random policy, for `sac` and
//! for `ddppo` (small networks and ensembles so it fits CI).
//!
//! The `ddppo` run trains its critic on real data only (`real_ratio = 1`) and
//! uses `H = 1`: Pendulum's observation wraps theta into [-pi, pi), and the
//! hanging start is exactly at the wrap, so a small learned model predicts
//! `s'` badly there and model rollouts would mislead the critic in so short a
//! run. The policy is still trained only by back-propagating through the two
//! learned models (equation 11), which is what this test is about.

use std::sync::Mutex;

use ddppo_agent::{Agent, AgentConfig, NoObserver, Variant};
use ddppo_env::{EnvFactory, Task, evaluate_episodes};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn small(variant: Variant) -> AgentConfig {
    let mut c = AgentConfig::preset("pendulum").expect("preset");
    c.variant = variant;
    c.seed = 1;
    c.epochs = 7;
    c.epoch_length = 500;
    c.start_steps = 500;
    c.min_pool_size = 500;
    c.hidden = vec![64, 64];
    c.batch_size = 128;
    c.policy_updates_per_step = 3;
    c.critic_updates_per_step = 3;
    c.eval_every = 500;
    c.eval_workers = 2;
    // Models (unused by sac).
    c.model.ensemble_size = 3;
    c.model.elites = 2;
    c.model.hidden = 32;
    c.model.hidden_layers = 2;
    c.model.weight_decay = vec![0.0; 3];
    c.model.max_epochs = Some(30);
    c.model_train_freq = 500;
    c.rollout_batch_size = 200;
    c.gradient.neighbours = 5;
    c.gradient.weight = 1.0;
    c.real_ratio = 1.0;
    c.horizon = 1;
    c
}

/// Mean return of 10 episodes of uniform random torques.
fn random_policy_return() -> f64 {
    let factory = EnvFactory::new(Task::Pendulum).expect("pendulum");
    let rng = Mutex::new(ChaCha8Rng::seed_from_u64(99));
    let policy = |_: &[f64]| vec![rng.lock().expect("rng").random_range(-2.0..2.0)];
    let eps = evaluate_episodes(&factory, &policy, 10, 12345, 1).expect("episodes");
    eps.iter().map(|e| e.ret).sum::<f64>() / eps.len() as f64
}

/// candle's CPU matmul spreads over `RAYON_NUM_THREADS` threads (default: all
/// cores); on a 2-core CI machine running other tests at the same time, the
/// threads wait on each other and these runs take ~5x longer (measured 284 s
/// against 56-69 s). One thread per matmul is the fast setting here.
fn single_threaded_matmul() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            // SAFETY: called before this test binary does any tensor work, and
            // every reader of the variable (candle) goes through std::env,
            // which serialises access to the environment.
            unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
        }
    });
}

fn learns(variant: Variant) {
    single_threaded_matmul();
    let random = random_policy_return();
    let mut agent = Agent::new(small(variant)).expect("agent");
    let records = agent.train(None, &mut NoObserver).expect("training");
    let last = records.last().expect("records");
    assert_eq!(last.env_steps, 3500);
    assert!(last.critic_updates > 0 && last.policy_updates > 0);
    let curve: Vec<(usize, i64)> = records.iter().map(|r| (r.env_steps, r.return_mean as i64)).collect();
    assert!(
        last.return_mean > random + 300.0,
        "{}: final return {:.0} not clearly above the random policy's {random:.0}; curve {curve:?}",
        variant.name(),
        last.return_mean
    );
}

#[test]
fn sac_learns_pendulum() {
    learns(Variant::Sac);
}

#[test]
fn ddppo_learns_pendulum() {
    learns(Variant::Ddppo);
}
