//! A checkpoint holds the whole run: the step-(s + k) checkpoint of a run that
//! went on from step s in memory equals, byte for byte, the one written by a
//! fresh `ddppo` process that loaded the step-s checkpoint and ran the same k
//! steps (every file but `clock.json`, the wall-clock figures). A value of the
//! run left out of the checkpoint makes the second run differ somewhere in
//! its buffers, networks, random streams, counters or metrics.

mod common;

use common::{TINY, ddppo, metrics, s};
use std::path::Path;

/// Every file of a checkpoint but the wall-clock one, by name.
fn files(checkpoint: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(checkpoint)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(name, _)| name != "clock.json")
        .map(|(name, path)| (name, std::fs::read(path).unwrap()))
        .collect();
    out.sort();
    out
}

fn identical_after_reload(name: &str, task: &str, variant: &str) {
    let tmp = common::tempdir("checkpoint-identity", name);
    let cfg = tmp.join("tiny.toml");
    // A checkpoint at s = 330, between an evaluation and the next (the
    // loss accumulators hold 30 updates) and inside a training episode
    // (Pendulum's have 200 steps), after the first model training; the
    // final one at s + k = 570, again inside an episode, with another model
    // training, rollouts, updates and evaluations (at 380, before the
    // episode of step 330 ends, and 570) in between.
    let toml = TINY
        .replace("task = \"pendulum\"", &format!("task = \"{task}\""))
        .replace("variant = \"ddppo\"", &format!("variant = \"{variant}\""))
        .replace("epoch_length = 600", "epoch_length = 570")
        .replace("eval_every = 150", "eval_every = 190")
        .replace("checkpoint_every = 150", "checkpoint_every = 330");
    std::fs::write(&cfg, toml).unwrap();
    let first = tmp.join("first");
    let o = ddppo(&["train", "--config", s(&cfg), "--out", s(&first)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (at_s, at_end) = (Path::new("checkpoints/step-0000000330"), Path::new("checkpoints/step-0000000570"));
    assert!(first.join(at_s).join("MANIFEST.json").is_file() && first.join(at_end).join("clock.json").is_file());

    // The same run directory holding only the step-s checkpoint, continued by
    // a fresh process.
    let second = tmp.join("second");
    std::fs::create_dir_all(second.join(at_s)).unwrap();
    for f in ["config.toml", "metrics.jsonl", "metrics.csv"] {
        std::fs::copy(first.join(f), second.join(f)).unwrap();
    }
    for e in std::fs::read_dir(first.join(at_s)).unwrap().flatten() {
        std::fs::copy(e.path(), second.join(at_s).join(e.file_name())).unwrap();
    }
    let o = ddppo(&["train", "--resume", s(&second)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("resuming") && err.contains("step-0000000330"), "{err}");

    let (want, got) = (files(&first.join(at_end)), files(&second.join(at_end)));
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got), names(&want), "{name}: the checkpoints hold different files");
    let differ: Vec<&str> = want.iter().zip(&got).filter(|(a, b)| a.1 != b.1).map(|(a, _)| a.0.as_str()).collect();
    assert!(differ.is_empty(), "{name}: {differ:?} differ from the uninterrupted run's after a reload at step 330");
    assert_eq!(metrics(&second), metrics(&first), "{name}: metrics");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn ddppo_on_pendulum() {
    identical_after_reload("ddppo-pendulum", "pendulum", "ddppo");
}

#[test]
fn sac_on_pendulum() {
    identical_after_reload("sac-pendulum", "pendulum", "sac");
}

/// A MuJoCo task with terminations: the simulator state and the episode in
/// progress are part of the checkpoint.
#[test]
fn ddppo_on_inverted_pendulum() {
    identical_after_reload("ddppo-inverted-pendulum", "inverted-pendulum", "ddppo");
}

#[test]
fn sac_on_inverted_pendulum() {
    identical_after_reload("sac-inverted-pendulum", "inverted-pendulum", "sac");
}
