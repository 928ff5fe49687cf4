//! The model env's host-device copies, counted on the CPU (every copy goes
//! through `ddppo_models::transfer`): a policy update makes a fixed number of
//! them whatever its horizon `H`, so on a GPU its model steps make no round
//! trip; the critic's rollout into `D_model` copies per step (it pushes into
//! the host buffer), and exactly as many as it says.

use ddppo_agent::{Agent, AgentConfig, Variant};
use ddppo_models::transfer;

fn tiny(variant: Variant, horizon: usize) -> AgentConfig {
    let mut c = AgentConfig::preset("pendulum").expect("preset");
    c.variant = variant;
    c.horizon = horizon;
    c.seed = 5;
    c.epochs = 1;
    c.epoch_length = 200;
    c.start_steps = 60;
    c.min_pool_size = 60;
    c.model_train_freq = 60;
    c.rollout_batch_size = 50;
    c.eval_every = 200;
    c.eval_episodes = 1;
    c.hidden = vec![16, 16];
    c.batch_size = 32;
    c.model.ensemble_size = 3;
    c.model.elites = 2;
    c.model.hidden = 16;
    c.model.hidden_layers = 2;
    c.model.weight_decay = vec![0.0; 3];
    c.model.max_epochs = Some(2);
    c.gradient.neighbours = 3;
    c
}

/// An agent whose models are trained once, ready for model-based updates.
fn trained(cfg: AgentConfig) -> Agent {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: set before any tensor work of this test binary; candle reads
        // it through std::env, which serialises access.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    let mut agent = Agent::new(cfg).expect("agent");
    while agent.run_state().model_trainings == 0 {
        agent.step().expect("step");
    }
    agent
}

fn policy_update_copies(variant: Variant, horizon: usize) -> u64 {
    let mut agent = trained(tiny(variant, horizon));
    let before = transfer::copies();
    agent.update_policy_through_model().expect("policy update");
    transfer::copies() - before
}

#[test]
fn a_policy_update_copies_the_same_for_any_horizon() {
    // Up: start states, policy noise, model noise, the rollout model's members,
    // the gradient ensemble's members (ddppo only), the alive masks. Back: the
    // predicted states (terminations), alpha, the loss.
    for (variant, expected) in [(Variant::Ddppo, 9), (Variant::NoGradLoss, 8)] {
        for horizon in [1, 5] {
            let copies = policy_update_copies(variant, horizon);
            assert_eq!(copies, expected, "{} with H = {horizon}", variant.name());
        }
    }
}

#[test]
fn the_critic_rollout_copies_per_step() {
    let mut agent = trained(tiny(Variant::Mbpo, 1));
    let k = agent.config().rollout_schedule.length(0);
    let pool = agent.model_buffer.len();
    let before = transfer::copies();
    agent.rollout_models().expect("rollout");
    let copies = transfer::copies() - before;
    // Pendulum never terminates: every row runs all k steps, each making 7
    // copies (states, policy noise, members and model noise up; actions,
    // rewards and next states back).
    assert_eq!(copies, 7 * k as u64, "k = {k}");
    assert_eq!(agent.model_buffer.len() - pool, 50 * k);
}
