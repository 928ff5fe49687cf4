//! An interrupt flag raised before a model training stops the step inside
//! the training; the part-done training is undone, and the run then goes on
//! exactly as the uninterrupted one, both in the same process and from a
//! checkpoint written at that moment (the path a SIGTERM takes in `ddppo
//! train`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ddppo_agent::{Agent, AgentConfig, Checkpoints, Error, EvalRecord, Observer, ObserverError};

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

/// Collects the records of [`Agent::train`] and raises the interrupt flag
/// after env step `raise_at` (as a signal arriving then would).
struct Watch {
    records: Vec<serde_json::Value>,
    raise_at: Option<(usize, Arc<AtomicBool>)>,
}

impl Observer for Watch {
    fn on_step(&mut self, env_steps: usize, _total: usize) {
        if let Some((at, flag)) = &self.raise_at
            && *at == env_steps
        {
            flag.store(true, Ordering::Relaxed);
        }
    }
    fn on_eval(&mut self, r: &EvalRecord) -> Result<(), ObserverError> {
        self.records.push(strip(r));
        Ok(())
    }
}

fn run_to_end(agent: &mut Agent, out: &mut Vec<serde_json::Value>) {
    let mut watch = Watch { records: Vec::new(), raise_at: None };
    agent.train(None, &mut watch).expect("train");
    assert!(agent.finished());
    out.extend(watch.records);
}

#[test]
fn an_interrupted_model_training_is_undone_and_the_run_continues_identically() {
    let mut full = Agent::new(tiny()).expect("agent");
    let mut expected = Vec::new();
    run_to_end(&mut full, &mut expected);
    assert_eq!(expected.len(), 4, "evaluations at 0, 150, 300, 450");

    let flag = Arc::new(AtomicBool::new(false));
    let mut agent = Agent::new(tiny()).expect("agent");
    agent.set_interrupt(flag.clone());
    // The loop up to the step before the second model training (at 300 env
    // steps), where the flag goes up and the loop stops between two steps.
    let mut watch = Watch { records: Vec::new(), raise_at: Some((299, flag.clone())) };
    agent.train(None, &mut watch).expect("train");
    let got = watch.records;
    assert_eq!(agent.env_steps(), 299);
    assert_eq!(agent.run_state().model_trainings, 1, "the training at 200 env steps");
    let before = agent.run_state().critic_updates;

    // With the flag up, the step that trains the models at 300 env steps
    // stops in the training.
    assert!(matches!(agent.step(), Err(Error::Interrupted)));
    assert!(agent.is_mid_step() && !agent.finished());
    let run = agent.run_state();
    assert_eq!((run.env_steps, run.model_trainings, run.critic_updates), (300, 1, before));
    // The loop, entered with the flag up, only writes the interrupted state.
    let dir = std::env::temp_dir().join(format!("ddppo-interrupt-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let checkpoints = Checkpoints::new(&dir);
    let mut watch = Watch { records: Vec::new(), raise_at: None };
    assert!(agent.train(Some(&checkpoints), &mut watch).expect("train").is_empty());
    let (step, path) = checkpoints.newest().expect("list").expect("a checkpoint");
    assert_eq!(step, 300);

    // In the same process: lower the flag and go on.
    flag.store(false, Ordering::Relaxed);
    let mut same = got.clone();
    run_to_end(&mut agent, &mut same);
    assert_eq!(same, expected, "continued in memory");

    // From the checkpoint, in a fresh agent.
    let mut resumed = Agent::from_checkpoint(tiny(), candle_core::Device::Cpu, &path).expect("load");
    assert!(resumed.is_mid_step());
    // A branch cannot start inside an interrupted training.
    let e = Agent::branch_from_checkpoint(tiny(), candle_core::Device::Cpu, &path).err().expect("refused");
    assert!(e.to_string().contains("inside a model training"), "{e}");
    let mut got = got;
    run_to_end(&mut resumed, &mut got);
    assert_eq!(got, expected, "continued from the checkpoint");
    let _ = std::fs::remove_dir_all(&dir);
}
