//! What the agent's diagnostics tests share: a tiny Pendulum run through
//! every phase (warm-up, three model trainings, updates, four evaluations).

use ddppo_agent::{AgentConfig, Variant};

/// The Pendulum preset shrunk to 300 env steps with small networks.
pub fn tiny(variant: Variant, seed: u64, jacobian_states: usize) -> AgentConfig {
    let mut c = AgentConfig::preset("pendulum").expect("preset");
    c.variant = variant;
    c.seed = seed;
    c.epochs = 1;
    c.epoch_length = 300;
    c.start_steps = 100;
    c.min_pool_size = 100;
    c.model_train_freq = 100;
    c.rollout_batch_size = 100;
    c.eval_every = 100;
    c.eval_episodes = 2;
    c.hidden = vec![16, 16];
    c.batch_size = 32;
    c.policy_updates_per_step = 1;
    c.critic_updates_per_step = 1;
    c.model.ensemble_size = 3;
    c.model.elites = 2;
    c.model.hidden = 16;
    c.model.hidden_layers = 2;
    c.model.weight_decay = vec![0.0; 3];
    c.model.max_epochs = Some(3);
    c.gradient.neighbours = 3;
    c.jacobian_states = jacobian_states;
    c
}

/// One rayon thread unless the caller chose.
pub fn one_thread() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: set before any tensor work of the test binary; candle reads
        // it through std::env, which serialises access.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
}
