//! A closed stdout or stderr (`ddppo ... | head -1`) is no reason to stop:
//! the writes are dropped, a training run goes on to its end, and nothing
//! panics.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// The write end of a pipe whose reader is already gone: every write to it
/// fails with EPIPE, from the first byte on.
fn closed_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    writer
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ddppo-pipes-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A pendulum run of a few hundred steps: evaluations, a checkpoint and the
/// closing lines all write to stderr.
const TINY: &[&str] = &[
    "train",
    "--env",
    "pendulum",
    "--variant",
    "sac",
    "--set",
    "epochs=1",
    "--set",
    "epoch_length=300",
    "--set",
    "start_steps=100",
    "--set",
    "min_pool_size=100",
    "--set",
    "eval_every=100",
    "--set",
    "eval_episodes=1",
    "--set",
    "checkpoint_every=200",
    "--set",
    "hidden=[16, 16]",
    "--set",
    "batch_size=16",
    "--set",
    "policy_updates_per_step=1",
    "--set",
    "critic_updates_per_step=1",
];

fn run(args: &[&str], stdout: Stdio, stderr: Stdio) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddppo")).args(args).stdout(stdout).stderr(stderr).output().unwrap()
}

#[test]
fn training_goes_on_with_stderr_and_stdout_closed() {
    let out = tempdir("train").join("run");
    let mut args = TINY.to_vec();
    args.extend(["--out", out.to_str().unwrap()]);
    let o = run(&args, Stdio::from(closed_pipe()), Stdio::from(closed_pipe()));
    assert_eq!(o.status.code(), Some(0), "the run stopped: {:?}", o.status);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4, "{metrics}");
    assert!(out.join("checkpoints").join("step-0000000300").is_dir());
}

#[test]
fn listing_into_a_closed_pipe_ends_quietly() {
    // Only stdout closed: nothing to report on stderr either.
    let o = run(&["env", "list"], Stdio::from(closed_pipe()), Stdio::piped());
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stderr.is_empty(), "{}", String::from_utf8_lossy(&o.stderr));
    // Both closed: an error line that cannot be written is no panic.
    let o = run(
        &["env", "replay", "--env", "cartpole", "--input", "x"],
        Stdio::from(closed_pipe()),
        Stdio::from(closed_pipe()),
    );
    assert_eq!(o.status.code(), Some(1));
    let o = run(&["--help"], Stdio::from(closed_pipe()), Stdio::from(closed_pipe()));
    assert_eq!(o.status.code(), Some(0));
}
