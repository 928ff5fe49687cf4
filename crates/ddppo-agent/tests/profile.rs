//! The profile's hooks: recorded transitions are the run's own first ones,
//! a profiled agent stands where a run stands after that many env steps, and
//! the last model training's epochs are the ones the training ran.

use ddppo_agent::profile::{critic_updates_per_step, last_model_training, load_transitions, record_transitions};
use ddppo_agent::{Agent, AgentConfig};

fn small() -> AgentConfig {
    let mut cfg = AgentConfig::preset("pendulum").unwrap();
    cfg.start_steps = 400;
    cfg.min_pool_size = 400;
    cfg.model_train_freq = 400;
    cfg.rollout_batch_size = 200;
    cfg.rollout_schedule = ddppo_agent::RolloutSchedule([0, 1, 2, 2]);
    cfg.model.ensemble_size = 3;
    cfg.model.elites = 2;
    cfg.model.hidden = 16;
    cfg.model.hidden_layers = 2;
    cfg.model.weight_decay = vec![1e-5; 3];
    cfg.model.max_epochs = Some(2);
    cfg.gradient.neighbours = 3;
    cfg
}

#[test]
fn recorded_transitions_are_the_runs_first_and_load_into_a_fresh_agent() {
    let cfg = small();
    let mut calls = 0;
    let data = record_transitions(&cfg, 399, &mut |_| calls += 1).unwrap();
    assert_eq!((data.len(), calls), (399, 0));

    // The run itself, stepped to just before its first model training.
    let mut run = Agent::new(cfg.clone()).unwrap();
    for _ in 0..399 {
        run.step().unwrap();
    }
    let (a, b) = (data.newest(399), run.env_buffer.newest(399));
    assert_eq!((a.obs, a.act, a.rew), (b.obs, b.act, b.rew));
    assert_eq!((a.next_obs, a.mask, a.done), (b.next_obs, b.mask, b.done));

    // A prefix goes into a fresh agent, which then stands at that step.
    let mut agent = Agent::new(cfg.clone()).unwrap();
    load_transitions(&mut agent, &data, 250).unwrap();
    assert_eq!((agent.env_steps(), agent.env_buffer.len()), (250, 250));
    assert_eq!(agent.env_buffer.newest(250).obs, data.newest(399).obs[..250 * data.obs_dim()]);
    // Only once, and never more rows than recorded.
    assert!(load_transitions(&mut agent, &data, 10).is_err());
    assert!(load_transitions(&mut Agent::new(cfg.clone()).unwrap(), &data, 400).is_err());
    assert!(record_transitions(&cfg, 0, &mut |_| {}).is_err());
}

#[test]
fn last_model_training_reports_each_ensembles_epochs() {
    let cfg = small();
    let data = record_transitions(&cfg, 300, &mut |_| {}).unwrap();
    let mut agent = Agent::new(cfg.clone()).unwrap();
    load_transitions(&mut agent, &data, 300).unwrap();
    assert_eq!(last_model_training(&agent), None);
    agent.train_models().unwrap();
    let t = last_model_training(&agent).expect("a training ran");
    let g = t.gradient.expect("ddppo has a gradient ensemble");
    // The cap of two epochs ends both trainings (early stopping needs more).
    assert_eq!((t.prediction.epochs, g.epochs), (2, 2));
    assert!(t.prediction.seconds > 0.0 && g.seconds > 0.0);
    // The rollout then fills D_model at the schedule's k = 2.
    agent.rollout_models().unwrap();
    assert!(agent.model_buffer.len() > 200 && agent.model_buffer.len() <= 400, "{}", agent.model_buffer.len());

    let mut sac = cfg.clone();
    sac.variant = ddppo_agent::Variant::Sac;
    let mut agent = Agent::new(sac).unwrap();
    load_transitions(&mut agent, &data, 300).unwrap();
    agent.train_models().unwrap();
    assert_eq!(last_model_training(&agent), None);

    let mut capped = cfg;
    assert_eq!(critic_updates_per_step(&capped), 10);
    capped.max_train_repeat_per_step = 4;
    assert_eq!(critic_updates_per_step(&capped), 4);
}

/// Each evaluation record's `model_epochs` and `grad_model_epochs` are the
/// sums of the epochs that the trainings since the previous evaluation ran
/// (counted here from each training's own report), and empty without the
/// ensemble.
#[test]
fn evaluation_records_sum_the_epochs_of_the_trainings_since_the_last() {
    let mut cfg = small();
    cfg.model_train_freq = 100;
    // Early stopping after one epoch without improvement, capped at 6: the
    // trainings run different numbers of epochs.
    cfg.model.patience = 1;
    cfg.model.max_epochs = Some(6);
    cfg.eval_episodes = 1;
    // Small per-step updates: the test is about the trainings.
    (cfg.policy_updates_per_step, cfg.critic_updates_per_step, cfg.batch_size) = (1, 1, 32);
    cfg.hidden = vec![32, 32];
    let mut agent = Agent::new(cfg.clone()).unwrap();
    let (mut trainings, mut sums, mut records) = (0, [0u64; 2], Vec::new());
    let mut seen = Vec::new();
    for step in 1..=750 {
        agent.step().unwrap();
        if agent.run_state().model_trainings > trainings {
            trainings = agent.run_state().model_trainings;
            let t = last_model_training(&agent).unwrap();
            sums[0] += t.prediction.epochs as u64;
            sums[1] += t.gradient.unwrap().epochs as u64;
            seen.push(t.prediction.epochs);
        }
        if step % 250 == 0 {
            let r = agent.evaluate().unwrap();
            records.push((r.model_epochs, r.grad_model_epochs));
            assert_eq!((r.model_epochs, r.grad_model_epochs), (Some(sums[0]), Some(sums[1])), "at step {step}");
            sums = [0; 2];
        }
    }
    // Trainings at 400, 500, 600 and 700: none before the second evaluation,
    // two in each interval after it, not all of the same length.
    assert_eq!(trainings, 4);
    assert_eq!(records[0], (Some(0), Some(0)));
    assert!(records[1].0.unwrap() >= 2 && records[2].0.unwrap() >= 2, "{records:?}");
    assert!(seen.iter().any(|&e| e != seen[0]) || seen[0] < 6, "{seen:?}");

    let mut sac = cfg;
    sac.variant = ddppo_agent::Variant::Sac;
    let mut agent = Agent::new(sac).unwrap();
    agent.step().unwrap();
    let r = agent.evaluate().unwrap();
    assert_eq!((r.model_epochs, r.grad_model_epochs), (None, None));
}
