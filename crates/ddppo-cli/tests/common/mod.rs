//! What the run-directory tests share: the tiny DDPPO config, temporary
//! directories, and the metrics without their wall-clock fields.
// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A tiny DDPPO run on Pendulum through every phase of Algorithm 1: warm-up,
/// three model trainings with rollouts, G1/G2 updates; an evaluation and a
/// checkpoint every 150 steps.
pub const TINY: &str = r#"
task = "pendulum"
variant = "ddppo"
seed = 3
epochs = 1
epoch_length = 600
start_steps = 300
min_pool_size = 300
model_train_freq = 150
rollout_batch_size = 300
policy_updates_per_step = 1
critic_updates_per_step = 1
batch_size = 32
hidden = [32, 32]
eval_every = 150
eval_episodes = 2
checkpoint_every = 150

[model]
ensemble_size = 3
elites = 2
hidden = 16
hidden_layers = 2
weight_decay = [2.5e-5, 5e-5, 1e-4]
max_epochs = 3

[gradient]
neighbours = 3
"#;

/// A fresh directory under the system's temp dir, unique to this process.
pub fn tempdir(test: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ddppo-{test}-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn ddppo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddppo")).args(args).output().unwrap()
}

/// The tiny config, with `KEY=VALUE` overrides, trained to its end (600 env
/// steps) into `dir/name`, whose newest two checkpoints (450, 600) remain.
pub fn tiny_run(dir: &Path, name: &str, sets: &[&str]) -> PathBuf {
    let cfg = dir.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let run = dir.join(name);
    let mut args = vec!["train", "--config", s(&cfg), "--out", s(&run)];
    for kv in sets {
        args.extend(["--set", kv]);
    }
    let o = ddppo(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    run
}

/// The metrics lines without their wall-clock fields.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("wall_s");
            o.remove("phase_s");
            v
        })
        .collect()
}

pub fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(300), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Asserts a user error: exit 1, one line on stderr that contains `expect`, no panic.
pub fn one_line_error(o: &Output, expect: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "expected exit 1 with '{expect}': {err}");
    assert!(err.contains(expect), "expected '{expect}' in: {err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Every file under `dir` with its bytes, sorted by path; the run
/// directory's lock file (created by any `train` on it) aside.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name() != "lock" {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}
