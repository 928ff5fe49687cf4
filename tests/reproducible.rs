//! A run is reproducible from its seed: the same config and seed give the
//! same evaluation records, bit for bit (all crates together: env resets,
//! exploration, replay sampling, ensemble training with its neighbour table,
//! model rollouts, critic and back-prop policy updates).

use ddppo::agent::{Agent, AgentConfig, EvalRecord, NoObserver, Variant};

/// A tiny DDPPO run on Pendulum that still passes through every phase of
/// Algorithm 1 (warm-up, two model trainings, rollouts, G1/G2 updates).
fn tiny(seed: u64) -> AgentConfig {
    let mut cfg = AgentConfig::preset("pendulum").expect("pendulum preset");
    cfg.variant = Variant::Ddppo;
    cfg.seed = seed;
    cfg.epochs = 1;
    cfg.epoch_length = 560;
    cfg.start_steps = 300;
    cfg.min_pool_size = 300;
    cfg.model_train_freq = 250;
    cfg.rollout_batch_size = 400;
    cfg.policy_updates_per_step = 1;
    cfg.critic_updates_per_step = 1;
    cfg.batch_size = 32;
    cfg.hidden = vec![32, 32];
    cfg.eval_every = 280;
    cfg.eval_episodes = 2;
    cfg.model.ensemble_size = 3;
    cfg.model.elites = 2;
    cfg.model.hidden = 16;
    cfg.model.hidden_layers = 2;
    cfg.model.weight_decay = vec![2.5e-5, 5e-5, 1e-4];
    cfg.model.max_epochs = Some(3);
    cfg.gradient.neighbours = 3;
    cfg
}

/// Everything of a record but the wall-clock fields.
fn comparable(mut r: EvalRecord) -> EvalRecord {
    r.wall_s = 0.0;
    r.phase_s = Default::default();
    r
}

fn run(seed: u64) -> Vec<EvalRecord> {
    let mut agent = Agent::new(tiny(seed)).expect("agent");
    // The loop `ddppo train` runs, without checkpoints.
    let out = agent.train(None, &mut NoObserver).expect("train");
    out.into_iter().map(comparable).collect()
}

#[test]
fn same_seed_same_records_other_seed_other_records() {
    let a = run(5);
    assert_eq!(a.len(), 3, "evaluations at 0, 280 and 560 steps");
    assert!(
        a[2].model_loss.is_some() && a[2].policy_updates > 0,
        "the run reached the model-based updates: {:?}",
        a[2]
    );
    assert_eq!(a, run(5), "same seed, different records");
    assert_ne!(a, run(6), "the seed has no effect");
}
