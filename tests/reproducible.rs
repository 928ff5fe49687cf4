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

/// A run whose per-step products and one-member model kernels are large
/// enough to be split over the helper threads (`ddppo_models::split`): SAC
/// batches of 256 rows through 64-wide layers, 64-wide ensembles rolled out
/// on 400 rows.
fn split_sized(seed: u64) -> AgentConfig {
    let mut cfg = tiny(seed);
    cfg.eval_every = 560;
    cfg.batch_size = 256;
    cfg.hidden = vec![64, 64];
    cfg.model.hidden = 64;
    cfg
}

const CHILD_OUT: &str = "DDPPO_REPRO_CHILD_OUT";

/// The same run with `DDPPO_MODEL_THREADS` = 1 and 2 (each in a child process
/// of this test binary, since the count is read once per process) gives the
/// same records bit for bit.
#[test]
fn model_thread_count_does_not_change_a_run() {
    if let Ok(path) = std::env::var(CHILD_OUT) {
        let mut agent = Agent::new(split_sized(3)).expect("agent");
        let out: Vec<EvalRecord> =
            agent.train(None, &mut NoObserver).expect("train").into_iter().map(comparable).collect();
        std::fs::write(path, format!("{out:#?}")).expect("write records");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ddppo-repro-threads-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let records: Vec<String> = [1, 2]
        .iter()
        .map(|threads| {
            let path = dir.join(format!("records-{threads}.txt"));
            let child = std::process::Command::new(std::env::current_exe().expect("test binary"))
                .args(["--exact", "model_thread_count_does_not_change_a_run", "--test-threads=1"])
                .env("DDPPO_MODEL_THREADS", threads.to_string())
                .env("RAYON_NUM_THREADS", "1")
                .env(CHILD_OUT, &path)
                .output()
                .expect("child run");
            assert!(
                child.status.success(),
                "the run with {threads} model threads failed:\n{}{}",
                String::from_utf8_lossy(&child.stdout),
                String::from_utf8_lossy(&child.stderr)
            );
            std::fs::read_to_string(&path).expect("records")
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    // The last record comes after a model training and the model-based updates.
    assert!(records[0].contains("model_loss: Some") && records[0].contains("policy_updates: 61,"), "{}", records[0]);
    assert!(records[0] == records[1], "1 and 2 model threads gave different records:\n{}\n{}", records[0], records[1]);
}
