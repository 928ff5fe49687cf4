//! Checkpoints and `--resume`: a run killed and resumed writes the same
//! metrics as an uninterrupted run with the same seed (CPU), and bad
//! checkpoints are one-line errors that leave the run directory untouched.

mod common;

use common::{TINY, ddppo, metrics, one_line_error, s, snapshot};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tempdir(name: &str) -> PathBuf {
    common::tempdir("resume", name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        let q = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &q);
        } else {
            std::fs::copy(&p, &q).unwrap();
        }
    }
}

fn checkpoint_steps(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn killed_and_resumed_run_matches_the_uninterrupted_one() {
    kill_and_resume("pendulum", TINY, true);
}

/// The same on a MuJoCo task with terminations (InvertedPendulum): the
/// simulator state and the episode in progress are part of the checkpoint.
#[test]
fn killed_and_resumed_mujoco_run_matches_the_uninterrupted_one() {
    kill_and_resume("inverted-pendulum", &TINY.replace("task = \"pendulum\"", "task = \"inverted-pendulum\""), false);
}

fn kill_and_resume(name: &str, toml: &str, damage: bool) {
    let tmp = tempdir(&format!("kill-{name}"));
    let cfg = tmp.join("tiny.toml");
    std::fs::write(&cfg, toml).unwrap();

    // The uninterrupted run.
    let full = tmp.join("full");
    let o = ddppo(&["train", "--config", s(&cfg), "--out", s(&full)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let expected = metrics(&full);
    assert_eq!(expected.len(), 5, "evaluations at 0, 150, ..., 600");
    assert!(expected[4]["policy_updates"].as_u64().unwrap() > 0 && !expected[4]["model_loss"].is_null());
    // The newest two checkpoints are kept, the final one included.
    assert_eq!(checkpoint_steps(&full), ["step-0000000450", "step-0000000600"]);
    // `ddppo checkpoint evaluate` on the final checkpoint reproduces the run's
    // last record, every diagnostic included (the loss means and epoch sums
    // were emptied by that evaluation, so a re-evaluation has none).
    let o = ddppo(&["checkpoint", "evaluate", s(&full.join("checkpoints").join("step-0000000600"))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut again: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut last = expected[4].clone();
    for v in [&mut again, &mut last] {
        let o = v.as_object_mut().unwrap();
        for k in ["wall_s", "phase_s", "critic_loss", "policy_loss", "model_epochs", "grad_model_epochs"] {
            o.remove(k);
        }
    }
    assert!(!last["policy_grad_q"].is_null() && !last["action_cost_true"].is_null(), "{last}");
    assert_eq!(again, last);
    // Not a checkpoint: its `../..` is this test's own directory (no
    // config.toml there), whatever the system's temp dir holds.
    one_line_error(&ddppo(&["checkpoint", "evaluate", s(&full.join("checkpoints"))]), "not inside a run directory");

    // The same run, killed (SIGKILL) right after its checkpoint at step 300,
    // once the model-based phase has begun.
    let cut = tmp.join("cut");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ddppo"))
        .args(["train", "--config", s(&cfg), "--out", s(&cut)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let marker = cut.join("checkpoints").join("step-0000000300");
    let started = Instant::now();
    while !marker.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before its checkpoint at step 300");
        }
        assert!(started.elapsed() < Duration::from_secs(600), "no checkpoint at step 300 after 10 minutes");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let newest = checkpoint_steps(&cut).last().cloned().unwrap();
    assert!(newest.as_str() < "step-0000000600", "the run was not interrupted: {newest}");
    let before = metrics(&cut);
    assert!(before.len() < expected.len(), "the run was not interrupted: {} lines", before.len());

    // A copy of the killed run with its checkpoints damaged in various ways:
    // one-line errors, and nothing in the run directory changes.
    let all_checkpoints = checkpoint_steps(&cut);
    assert_eq!(all_checkpoints.len(), 2, "{all_checkpoints:?}");
    let damaged = |name: &str, damage_it: &dyn Fn(&Path), expect: &str| {
        if !damage {
            return;
        }
        let dir = tmp.join(name);
        copy_dir(&cut, &dir);
        for ck in &all_checkpoints {
            damage_it(&dir.join("checkpoints").join(ck));
        }
        let files = snapshot(&dir);
        one_line_error(&ddppo(&["train", "--resume", s(&dir)]), expect);
        assert!(snapshot(&dir) == files, "{name}: --resume changed the run directory");
    };
    let truncate = |ck: &Path| {
        let f = ck.join("env_buffer.bin");
        let len = std::fs::metadata(&f).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    };
    let flip = |ck: &Path| {
        let f = ck.join("networks.safetensors");
        let mut b = std::fs::read(&f).unwrap();
        let i = b.len() - 7;
        b[i] ^= 0x20;
        std::fs::write(&f, b).unwrap();
    };
    damaged("truncated", &truncate, "env_buffer.bin: truncated");
    damaged("flipped", &flip, "networks.safetensors: corrupt");
    damaged("no-manifest", &|ck| std::fs::remove_file(ck.join("MANIFEST.json")).unwrap(), "incomplete");
    if damage {
        // A hand-edited config: refused by `--resume`, naming the key.
        let dir = tmp.join("other-config");
        copy_dir(&cut, &dir);
        let f = dir.join("config.toml");
        let text = std::fs::read_to_string(&f).unwrap().replace("seed = 3", "seed = 4");
        std::fs::write(&f, text).unwrap();
        let files = snapshot(&dir);
        one_line_error(&ddppo(&["train", "--resume", s(&dir)]), "different config (differing keys: seed)");
        assert!(snapshot(&dir) == files);
        // The same command with another seed: refused before the lock, naming the key.
        let o = ddppo(&["train", "--config", s(&cfg), "--seed", "5", "--out", s(&cut)]);
        one_line_error(&o, "already holds a different run (seed differs");

        // Only the newest checkpoint damaged: the older one kept for that
        // purpose takes over (one line says so) and the run still ends in
        // the uninterrupted metrics.
        let dir = tmp.join("fallback");
        copy_dir(&cut, &dir);
        flip(&dir.join("checkpoints").join(&newest));
        let o = ddppo(&["train", "--resume", s(&dir)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains("corrupt") && err.contains("falling back to the older checkpoint"), "{err}");
        assert_eq!(metrics(&dir), expected, "the run resumed from the older checkpoint differs");
    }

    // Resumed: the metrics from the checkpoint on equal the uninterrupted run's.
    let o = ddppo(&["train", "--resume", s(&cut)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("resuming"));
    assert_eq!(metrics(&cut), expected, "the resumed run differs from the uninterrupted one");
    let csv = std::fs::read_to_string(cut.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + expected.len(), "metrics.csv: a header and one row per evaluation");

    // A finished run has nothing to resume; its files stay as they are.
    let files = snapshot(&cut);
    let o = ddppo(&["train", "--resume", s(&cut)]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stderr).contains("nothing to resume"));
    assert!(snapshot(&cut) == files);

    // `ddppo eval` with the run's own episode seeds reproduces the last
    // evaluation of the run.
    let o = ddppo(&["eval", "--run", s(&full)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line = String::from_utf8_lossy(&o.stdout).to_string();
    let want = format!(
        "return {:.1} ± {:.1} over 2 episodes",
        expected[4]["return_mean"].as_f64().unwrap(),
        expected[4]["return_std"].as_f64().unwrap()
    );
    assert!(line.contains(&want) && line.contains("at 600 env steps"), "{line} lacks {want}");
    let o = ddppo(&["eval", "--run", s(&full), "--episodes", "3"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("over 3 episodes"));
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn resume_and_eval_without_a_checkpoint_are_one_line_errors() {
    let tmp = tempdir("none");
    let empty = tmp.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    one_line_error(&ddppo(&["train", "--resume", s(&empty)]), "not a run directory");
    one_line_error(&ddppo(&["eval", "--run", s(&empty)]), "not a run directory");
    // A run directory whose run never reached a checkpoint: `eval` has no
    // policy to load (`train --resume` starts it again: tests/run_lock.rs).
    let run = tmp.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let cfg = ddppo_agent::AgentConfig::preset("pendulum").unwrap().to_toml().unwrap();
    std::fs::write(run.join("config.toml"), cfg).unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{\"env_steps\":0,\"return_mean\":-1200.0}\n").unwrap();
    let files = snapshot(&run);
    one_line_error(&ddppo(&["eval", "--run", s(&run)]), "no complete checkpoint");
    // An interrupted checkpoint write (temporary name) does not count.
    std::fs::create_dir_all(run.join("checkpoints").join(".tmp-step-0000001000")).unwrap();
    one_line_error(&ddppo(&["eval", "--run", s(&run)]), "no complete checkpoint");
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    assert!(snapshot(&run) == files);
    let _ = std::fs::remove_dir_all(&tmp);
}
