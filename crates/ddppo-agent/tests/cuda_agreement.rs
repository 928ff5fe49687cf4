//! CUDA against the CPU (issue 15), run by `cargo xtask test --cuda` on a
//! machine with a GPU and compiled everywhere by CI's `cargo check --features
//! cuda`: the agreement checks of `device_check` within their f32 tolerances,
//! a short InvertedPendulum run on the GPU that reaches the maximum return
//! of 1000 within 3,000 env steps like the CPU run (README), and a checkpoint
//! written on one device that resumes on the other and keeps learning (not
//! bit-identical: the devices round differently).

use std::path::PathBuf;

use candle_core::Device;
use ddppo_agent::device_check::agreement;
use ddppo_agent::{Agent, AgentConfig, NoObserver};

fn cuda() -> Device {
    Device::new_cuda(0).expect("CUDA device 0 (these tests need a GPU)")
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ddppo-cuda-agreement-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[test]
fn cuda_agrees_with_the_cpu() {
    let checks = agreement(&cuda()).expect("checks");
    for c in &checks {
        println!("{c}");
    }
    assert_eq!(checks.len(), 6);
    let failed: Vec<String> = checks.iter().filter(|c| !c.passed()).map(|c| c.to_string()).collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn inverted_pendulum_reaches_1000_on_cuda_within_3000_steps() {
    let mut cfg = AgentConfig::preset("inverted-pendulum").expect("preset");
    cfg.epochs = 3;
    cfg.eval_every = 500;
    let mut agent = Agent::with_device(cfg, cuda()).expect("agent");
    let records = agent.train(None, &mut NoObserver).expect("training");
    let curve: Vec<(usize, f64)> = records.iter().map(|r| (r.env_steps, r.return_mean)).collect();
    assert_eq!(curve.last().map(|c| c.0), Some(3000));
    assert!(curve.iter().any(|&(_, r)| r >= 1000.0 - 1e-9), "no evaluation reached 1000: {curve:?}");
}

/// A small InvertedPendulum `ddppo` config: models trained at steps 200 and 400.
fn small() -> AgentConfig {
    let mut c = AgentConfig::preset("inverted-pendulum").expect("preset");
    c.epochs = 1;
    c.epoch_length = 600;
    c.start_steps = 200;
    c.min_pool_size = 200;
    c.model_train_freq = 200;
    c.rollout_batch_size = 1000;
    c.policy_updates_per_step = 2;
    c.critic_updates_per_step = 2;
    c.eval_every = 200;
    c.eval_episodes = 2;
    c.model.max_epochs = Some(5);
    c
}

/// Runs `agent` to `steps` env steps; returns the policy updates made on the way.
fn run_to(agent: &mut Agent, steps: usize) -> u64 {
    let before = agent.run_state().policy_updates;
    while agent.env_steps() < steps {
        if let Some(r) = agent.step().expect("step") {
            assert!(r.return_mean.is_finite() && r.critic_loss.is_none_or(f64::is_finite), "{r:?}");
        }
    }
    agent.run_state().policy_updates - before
}

#[test]
fn a_checkpoint_resumes_on_the_other_device() {
    let cfg = small();
    let mut cpu = Agent::new(cfg.clone()).expect("cpu agent");
    assert!(run_to(&mut cpu, 300) > 0);
    let on_cpu = tempdir("from-cpu");
    cpu.save_checkpoint(&on_cpu).expect("save on cpu");

    let mut gpu = Agent::from_checkpoint(cfg.clone(), cuda(), &on_cpu).expect("load on cuda");
    assert_eq!(gpu.env_steps(), 300);
    let before = gpu.policy.snapshot().expect("snapshot");
    assert!(run_to(&mut gpu, 450) > 0);
    assert_ne!(format!("{before:?}"), format!("{:?}", gpu.policy.snapshot().expect("snapshot")), "no learning");
    let on_gpu = tempdir("from-cuda");
    gpu.save_checkpoint(&on_gpu).expect("save on cuda");

    let mut back = Agent::from_checkpoint(cfg, Device::Cpu, &on_gpu).expect("load on cpu");
    assert_eq!(back.env_steps(), 450);
    assert!(run_to(&mut back, 600) > 0);
    let last = back.evaluate().expect("evaluation");
    assert!(last.return_mean.is_finite());
    let _ = std::fs::remove_dir_all(on_cpu);
    let _ = std::fs::remove_dir_all(on_gpu);
}
