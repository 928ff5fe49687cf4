//! `ddppo train` rejects bad input with one line and exit code 1, before it
//! writes anything, and never touches a directory that holds another run.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ddppo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ddppo")).args(args).output().unwrap()
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ddppo-train-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `ddppo train ARGS --out OUT` and checks the one-line error.
fn rejects(args: &[&str], out: &Path, expect: &str) {
    let mut all = vec!["train"];
    all.extend_from_slice(args);
    all.extend(["--out", out.to_str().unwrap()]);
    let o = ddppo(&all);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{all:?}: {err}");
    assert!(err.contains(expect), "{all:?}: expected '{expect}' in: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{all:?}: not one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let body = err.trim().trim_start_matches("error: ");
    assert!(!body.is_empty() && err.matches(expect).count() == 1, "{all:?}: cause repeated: {err}");
}

#[test]
fn bad_values_are_one_line_errors_and_write_nothing() {
    let tmp = tempdir("values");
    let out = tmp.join("run");
    let bad_toml = tmp.join("bad.toml");
    std::fs::write(&bad_toml, "task = \"hopper\"\nepochs = [\n").unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--env", "cartpole"], "unknown env `cartpole`"),
        (&["--env", "hopper", "--variant", "ppo"], "unknown variant `ppo`"),
        (&["--env", "hopper", "--set", "no_such_key=1"], "unknown field `no_such_key`"),
        (&["--env", "hopper", "--set", "model.no_such_key=1"], "unknown field `no_such_key`"),
        (&["--env", "hopper", "--set", "critic_lr=-0.1"], "critic_lr"),
        (&["--env", "hopper", "--set", "gradient.neighbours=0"], "neighbours"),
        (&["--env", "hopper", "--set", "real_ratio=1.5"], "real_ratio"),
        (&["--env", "hopper", "--set", "horizon=0"], "horizon"),
        (&["--env", "hopper", "--set", "epochs"], "expected KEY=VALUE"),
        (&["--env", "hopper", "--device", "tpu"], "unknown device `tpu`"),
        (&["--config", bad_toml.to_str().unwrap()], "not valid TOML"),
        (&["--config", "/nonexistent/ddppo.toml"], "cannot read"),
    ];
    for (args, expect) in cases {
        rejects(args, &out, expect);
        assert!(!out.exists(), "{args:?} created the run directory");
    }
    #[cfg(not(feature = "cuda"))]
    rejects(&["--env", "hopper", "--device", "cuda"], &out, "no CUDA support");
    assert!(!out.exists());
}

#[test]
fn a_directory_with_another_run_or_other_files_is_left_alone() {
    let tmp = tempdir("dirs");
    // Another run: its config differs (another seed).
    let other = tmp.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("config.toml"), "task = \"hopper\"\nseed = 7\n").unwrap();
    std::fs::write(other.join("metrics.jsonl"), "precious\n").unwrap();
    rejects(&["--env", "hopper"], &other, "already holds a different run");
    assert_eq!(std::fs::read_to_string(other.join("metrics.jsonl")).unwrap(), "precious\n");
    assert_eq!(std::fs::read_to_string(other.join("config.toml")).unwrap(), "task = \"hopper\"\nseed = 7\n");
    // Not a run at all.
    let stuff = tmp.join("stuff");
    std::fs::create_dir_all(&stuff).unwrap();
    std::fs::write(stuff.join("notes.txt"), "mine").unwrap();
    rejects(&["--env", "hopper"], &stuff, "is not empty and holds no run");
    assert_eq!(std::fs::read_dir(&stuff).unwrap().count(), 1);
    // A file.
    let file = tmp.join("file");
    std::fs::write(&file, "x").unwrap();
    rejects(&["--env", "hopper"], &file, "is not a directory");
    assert_eq!(std::fs::read_to_string(other.join("metrics.jsonl")).unwrap(), "precious\n");
}
