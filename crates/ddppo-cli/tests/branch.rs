//! `ddppo train --from`: a branch of a run from one of its checkpoints. With
//! the checkpoint's own config it is the resumed run, bit for bit; with
//! `--set` it trains on from the same state under the new settings; keys
//! that fix the networks or the random streams are refused; the source run
//! is only read.

mod common;

use common::{ddppo, metrics, one_line_error, s, snapshot, tiny_run};
use std::path::PathBuf;
use std::process::Output;

fn tempdir(name: &str) -> PathBuf {
    common::tempdir("branch", name)
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    err
}

fn step_of(v: &serde_json::Value) -> u64 {
    v["env_steps"].as_u64().unwrap()
}

/// A test's directory and the source run in it: the tiny config trained to
/// its end (600), with the checkpoints at 450 and 600 kept.
fn source_run(name: &str) -> (PathBuf, PathBuf) {
    let tmp = tempdir(name);
    let full = tiny_run(&tmp, "full", &[]);
    (tmp, full)
}

#[test]
fn a_branch_is_the_resumed_run_or_trains_on_under_its_new_settings() {
    // The source: the whole run, whose newest two checkpoints (450, 600) remain.
    let (tmp, full) = source_run("all");
    let expected = metrics(&full);
    assert_eq!(expected.iter().map(step_of).collect::<Vec<_>>(), [0, 150, 300, 450, 600]);
    let at450 = full.join("checkpoints").join("step-0000000450");
    let source = snapshot(&full);

    // The same config from step 450: exactly the rest of the source run,
    // and the copied history before it.
    let same = tmp.join("same");
    let err = ok(&ddppo(&["train", "--from", s(&at450), "--out", s(&same)]));
    assert!(err.contains("branching") && err.contains("the same config"), "{err}");
    assert_eq!(metrics(&same), expected, "a branch with the source's config differs from the source run");
    assert_eq!(
        std::fs::read(same.join("checkpoints").join("step-0000000600").join("networks.safetensors")).unwrap(),
        std::fs::read(full.join("checkpoints").join("step-0000000600").join("networks.safetensors")).unwrap(),
        "the final networks differ"
    );
    assert_eq!(std::fs::read(same.join("config.toml")).unwrap(), std::fs::read(full.join("config.toml")).unwrap());

    // Another critic learning rate and a longer run, from the source's newest
    // checkpoint (600, the run directory given): the history up to 600 is the
    // source's, the config holds the new values, and training goes on to 900.
    let longer = tmp.join("longer");
    let branch =
        ["train", "--from", s(&full), "--out", s(&longer), "--set", "critic_lr=1e-3", "--set", "epoch_length=900"];
    let err = ok(&ddppo(&branch));
    assert!(err.contains("changed: critic_lr, epoch_length"), "{err}");
    let got = metrics(&longer);
    assert_eq!(got.iter().map(step_of).collect::<Vec<_>>(), [0, 150, 300, 450, 600, 750, 900]);
    assert_eq!(got[..5], expected[..]);
    assert!(got[6]["critic_updates"].as_u64() > expected[4]["critic_updates"].as_u64(), "{}", got[6]);
    let config = std::fs::read_to_string(longer.join("config.toml")).unwrap();
    assert!(config.contains("critic_lr = 0.001") && config.contains("epoch_length = 900"), "{config}");
    // Its curves hold the copied history too (rebuilt from the metrics).
    assert!(longer.join("tb").is_dir());

    // The same branch command again: the branch exists and is complete.
    let o = ddppo(&branch);
    assert!(ok(&o).contains("nothing to resume"));

    // Keys the checkpoint's networks or streams depend on: refused, nothing written.
    for (set, key) in [("model.hidden=8", "model.hidden"), ("seed=4", "seed"), ("variant=\"mbpo\"", "variant")] {
        let out = tmp.join(format!("refused-{key}"));
        one_line_error(
            &ddppo(&["train", "--from", s(&at450), "--out", s(&out), "--set", set]),
            &format!("a branch cannot change {key}"),
        );
        assert!(!out.exists(), "{key}: the run directory was created");
    }
    // A config that ends where the checkpoint already is.
    let out = tmp.join("ended");
    one_line_error(
        &ddppo(&["train", "--from", s(&at450), "--out", s(&out), "--set", "epoch_length=450"]),
        "raise `epochs`",
    );
    assert!(!out.exists());
    // Not a run or a checkpoint; flags that name another base config.
    one_line_error(
        &ddppo(&["train", "--from", s(&full.join("checkpoints")), "--out", s(&tmp.join("x"))]),
        "is neither a run directory",
    );
    let o = ddppo(&["train", "--from", s(&full), "--env", "pendulum", "--out", s(&tmp.join("y"))]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));

    // The source run was only read.
    assert!(snapshot(&full) == source, "branching changed the source run");
}

/// A branch killed before its first checkpoint (here: only its config was
/// written) is started again by the same command, not run from step 0.
#[test]
fn an_unfinished_branch_is_started_again() {
    let (tmp, full) = source_run("unfinished");
    let at450 = full.join("checkpoints").join("step-0000000450");
    let b = tmp.join("b");
    ok(&ddppo(&["train", "--from", s(&at450), "--out", s(&b), "--set", "policy_lr=1e-3"]));
    let expected = metrics(&b);
    // The new learning rate took effect: the same history to 450, another policy after it.
    let source = metrics(&full);
    assert_eq!(expected[..4], source[..4]);
    assert_ne!(expected[4]["policy_loss"], source[4]["policy_loss"]);
    // As if killed right after writing its config.
    std::fs::remove_dir_all(b.join("checkpoints")).unwrap();
    std::fs::write(b.join("metrics.jsonl"), "").unwrap();
    let err = ok(&ddppo(&["train", "--from", s(&at450), "--out", s(&b), "--set", "policy_lr=1e-3"]));
    assert!(err.contains("branching"), "{err}");
    assert_eq!(metrics(&b), expected);
    // Another override on the same directory is a different run: refused.
    one_line_error(
        &ddppo(&["train", "--from", s(&at450), "--out", s(&b), "--set", "policy_lr=2e-3"]),
        "already holds a different run (policy_lr differs",
    );
}
