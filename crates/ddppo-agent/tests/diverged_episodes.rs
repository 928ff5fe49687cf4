//! A training episode whose simulation diverges (MuJoCo's instability check)
//! ends there as a truncation: no transition out of the simulator's reset is
//! stored, the run goes on, the caller gets a warning line, and the count is
//! in the metrics and survives a checkpoint.
#![cfg(feature = "mujoco")]

use candle_core::Device;
use ddppo_agent::{Agent, AgentConfig, Checkpoints, EvalRecord, Observer, ObserverError, Variant};

#[derive(Default)]
struct Seen {
    warnings: Vec<String>,
    records: Vec<EvalRecord>,
}

impl Observer for Seen {
    fn on_eval(&mut self, record: &EvalRecord) -> Result<(), ObserverError> {
        self.records.push(record.clone());
        Ok(())
    }
    fn on_warning(&mut self, message: &str) {
        self.warnings.push(message.to_string());
    }
}

#[test]
fn a_diverged_training_episode_is_cut_counted_and_reported() {
    let mut cfg = AgentConfig::preset("inverted-pendulum").unwrap();
    cfg.variant = Variant::Sac;
    cfg.hidden = vec![16, 16];
    cfg.batch_size = 16;
    cfg.start_steps = 40;
    cfg.min_pool_size = 40;
    cfg.epochs = 1;
    cfg.epoch_length = 100;
    cfg.eval_every = 50;
    cfg.eval_episodes = 2;
    cfg.policy_updates_per_step = 1;
    cfg.critic_updates_per_step = 1;
    let mut agent = Agent::new(cfg.clone()).unwrap();
    for _ in 0..10 {
        agent.step().unwrap();
    }
    assert_eq!(agent.env_buffer.len(), 10);
    // The saved state is [steps, x_before, time, qpos..., qvel..., ...]
    // (mjSTATE_INTEGRATION's order): a qpos beyond MuJoCo's 1e10 limit.
    let mut state = agent.env_mut().save_state();
    state[3] = 1e308;
    agent.env_mut().restore_state(&state).unwrap();

    let mut seen = Seen::default();
    agent.train(None, &mut seen).unwrap();
    assert_eq!(agent.env_steps(), 100);
    assert_eq!(agent.run_state().diverged_episodes, 1);
    // The diverged step stored nothing: its "next state" was MuJoCo's reset pose.
    assert_eq!(agent.env_buffer.len(), 99);
    assert_eq!(seen.warnings.len(), 1, "{:?}", seen.warnings);
    let w = &seen.warnings[0];
    assert!(w.contains("env step 11") && w.contains("diverged") && w.contains("truncation"), "{w}");
    assert!(!w.contains('\n'), "{w}");
    let last = seen.records.last().unwrap();
    assert_eq!((last.env_steps, last.diverged_episodes, last.eval_diverged_episodes), (100, 1, 0));
    assert!(last.return_mean.is_finite());
    let line = serde_json::to_value(last).unwrap();
    assert_eq!(line["diverged_episodes"], 1);

    // The count is part of the run's state.
    let dir = std::env::temp_dir().join(format!("ddppo-diverged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = Checkpoints::new(&dir).save(&mut agent).unwrap();
    let resumed = Agent::from_checkpoint(cfg, Device::Cpu, &path).unwrap();
    assert_eq!(resumed.run_state().diverged_episodes, 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
