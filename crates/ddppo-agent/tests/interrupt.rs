//! An interrupt flag raised before a model training stops the step inside
//! the training; the part-done training is undone, and the run then goes on
//! exactly as the uninterrupted one, both in the same process and from a
//! checkpoint written at that moment (the path a SIGTERM takes in `ddppo
//! train`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ddppo_agent::{Agent, AgentConfig, Error, EvalRecord};

fn tiny() -> AgentConfig {
    let mut c = AgentConfig::from_toml_str(
        r#"
task = "pendulum"
variant = "ddppo"
seed = 5
epochs = 1
epoch_length = 450
start_steps = 200
min_pool_size = 200
model_train_freq = 100
rollout_batch_size = 200
policy_updates_per_step = 1
critic_updates_per_step = 1
batch_size = 32
hidden = [32, 32]
eval_every = 150
eval_episodes = 2

[model]
ensemble_size = 3
elites = 2
hidden = 16
hidden_layers = 2
weight_decay = [2.5e-5, 5e-5, 1e-4]
max_epochs = 4

[gradient]
neighbours = 3
"#,
    )
    .expect("config");
    c.eval_workers = 1;
    c
}

/// Evaluation records without the wall-clock fields.
fn strip(r: &EvalRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(r).expect("json");
    let o = v.as_object_mut().expect("object");
    o.remove("wall_s");
    o.remove("phase_s");
    v
}

fn run_to_end(agent: &mut Agent, out: &mut Vec<serde_json::Value>) {
    while !agent.finished() {
        if let Some(r) = agent.step().expect("step") {
            out.push(strip(&r));
        }
    }
}

#[test]
fn an_interrupted_model_training_is_undone_and_the_run_continues_identically() {
    let mut full = Agent::new(tiny()).expect("agent");
    let mut expected = Vec::new();
    run_to_end(&mut full, &mut expected);
    assert_eq!(expected.len(), 3, "evaluations at 150, 300, 450");

    let flag = Arc::new(AtomicBool::new(false));
    let mut agent = Agent::new(tiny()).expect("agent");
    agent.set_interrupt(flag.clone());
    let mut got = Vec::new();
    // Up to the step before the second model training (at 300 env steps).
    while agent.env_steps < 299 {
        if let Some(r) = agent.step().expect("step") {
            got.push(strip(&r));
        }
    }
    assert_eq!(agent.model_trainings, 1, "the training at 200 env steps");
    let before = agent.critic_updates;

    // The step that trains the models at 300 env steps stops in the training.
    flag.store(true, Ordering::Relaxed);
    assert!(matches!(agent.step(), Err(Error::Interrupted)));
    assert!(agent.is_mid_step() && !agent.finished());
    assert_eq!((agent.env_steps, agent.model_trainings, agent.critic_updates), (300, 1, before));
    let dir = std::env::temp_dir().join(format!("ddppo-interrupt-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    agent.save_checkpoint(&dir).expect("checkpoint");

    // In the same process: lower the flag and go on.
    flag.store(false, Ordering::Relaxed);
    let mut same = got.clone();
    run_to_end(&mut agent, &mut same);
    assert_eq!(same, expected, "continued in memory");

    // From the checkpoint, in a fresh agent.
    let mut resumed = Agent::from_checkpoint(tiny(), candle_core::Device::Cpu, &dir).expect("load");
    assert!(resumed.is_mid_step());
    run_to_end(&mut resumed, &mut got);
    assert_eq!(got, expected, "continued from the checkpoint");
    let _ = std::fs::remove_dir_all(&dir);
}
