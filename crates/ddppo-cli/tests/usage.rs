//! Command-line usage errors are one line with a pointer to `--help` and exit
//! code 2 (not clap's usage block); `--help` and `--version` print as usual.

use std::process::{Command, Output};

fn ddppo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddppo")).args(args).output().unwrap()
}

/// Exit 2, nothing on stdout, one stderr line `error: ...` holding every
/// needle and the pointer to the subcommand's `--help`.
fn usage_error(args: &[&str], needles: &[&str], help: &str) {
    let o = ddppo(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    assert!(o.stdout.is_empty(), "{args:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: not one line: {err}");
    assert!(err.starts_with("error: "), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected `{n}` in: {err}");
    }
    assert!(err.trim_end().ends_with(&format!("see `{help} --help`")), "{args:?}: {err}");
    assert!(!err.contains("Usage:") && !err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn argument_errors_are_one_line_and_point_to_help() {
    usage_error(&["train", "--bogus"], &["unexpected argument '--bogus'"], "ddppo train");
    usage_error(&["trian"], &["unrecognized subcommand 'trian'", "train"], "ddppo");
    usage_error(&["train", "--env", "hopper"], &["required arguments were not provided", "--out <OUT>"], "ddppo train");
    usage_error(
        &["train", "--env", "hopper", "--seed", "abc", "--out", "x"],
        &["invalid value 'abc'", "--seed"],
        "ddppo train",
    );
    usage_error(&["train", "--env"], &["a value is required for '--env <ENV>'"], "ddppo train");
    usage_error(&["env", "replay", "--env", "hopper"], &["--input <INPUT>"], "ddppo env replay");
    usage_error(&["train", "--resume", "a", "--out", "b"], &["cannot be used with"], "ddppo train");
}

#[test]
fn eval_episodes_are_bounded_before_anything_runs() {
    // Each of these once panicked (u64::MAX), aborted on a 48 GB allocation
    // (2e9) or evaluated nothing (0); the run directory need not exist.
    for n in ["0", "10001", "2000000000", "18446744073709551615", "18446744073709551616"] {
        let o = ddppo(&["eval", "--run", "no/such/run", "--episodes", n]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "--episodes {n}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "--episodes {n}: {err}");
        assert!(err.contains("--episodes") && err.contains("ddppo eval --help"), "--episodes {n}: {err}");
    }
    // 10000 passes the parser: the next error is the missing run.
    let o = ddppo(&["eval", "--run", "no/such/run", "--episodes", "10000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a run directory"));
}

#[test]
fn help_and_version_still_print_normally() {
    for args in [&["--help"][..], &["train", "--help"], &["help", "eval"], &["env", "replay", "--help"]] {
        let o = ddppo(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("Usage: ddppo") && out.lines().count() > 3, "{args:?}: {out}");
        assert!(o.stderr.is_empty(), "{args:?}");
    }
    let o = ddppo(&["--version"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), format!("ddppo {}", env!("CARGO_PKG_VERSION")));
}
