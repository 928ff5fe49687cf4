//! One owner per run directory, torn metrics lines, and a run killed before
//! its first checkpoint: never a dead end, never lost data.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const TINY: &str = r#"
task = "pendulum"
variant = "sac"
seed = 2
epochs = 1
epoch_length = 1200
start_steps = 200
min_pool_size = 200
policy_updates_per_step = 1
critic_updates_per_step = 1
batch_size = 32
hidden = [32, 32]
eval_every = 300
eval_episodes = 2
checkpoint_every = 600
"#;

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ddppo-lock-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn train(cfg: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ddppo"));
    c.args(["train", "--config", s(cfg), "--out", s(out)]).args(extra).env("RAYON_NUM_THREADS", "1");
    c
}

fn ddppo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddppo")).args(args).output().unwrap()
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
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

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(300), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn uninterrupted(tmp: &Path, cfg: &Path) -> Vec<serde_json::Value> {
    let full = tmp.join("full");
    let o = train(cfg, &full, &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = metrics(&full);
    assert_eq!(m.len(), 5);
    m
}

/// A second process on a running run's directory (the same command, or
/// `--resume`) waits up to `--lock-wait`, then refuses with one line naming
/// the holder; the first run finishes untouched. A requeued job that starts
/// while its predecessor still checkpoints waits for it and continues.
#[test]
fn a_second_process_on_a_run_directory_waits_then_refuses_naming_the_holder() {
    let tmp = tempdir("lock");
    let cfg = tmp.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let expected = uninterrupted(&tmp, &cfg);

    let run = tmp.join("run");
    let first = train(&cfg, &run, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let lock = run.join("lock");
    wait_for("the first run's lock", || std::fs::read_to_string(&lock).is_ok_and(|t| t.contains("pid")));
    for extra in [vec!["--lock-wait", "1"]] {
        let o = train(&cfg, &run, &extra).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        let last = err.trim().lines().last().unwrap_or_default().to_string();
        assert!(last.starts_with("error: ") && last.contains(&format!("pid {}", first.id())), "{err}");
    }
    let o = ddppo(&["train", "--resume", s(&run), "--lock-wait", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by") && err.trim().lines().count() == 1, "{err}");

    // The requeue: SIGTERM to the first, and at once the same command again.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let second = train(&cfg, &run, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{err}");
    let out = first.wait_with_output().unwrap();
    assert!(matches!(out.status.code(), Some(75) | Some(0)), "{:?}", out.status);
    assert_eq!(metrics(&run), expected, "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A torn last metrics line (a full disk mid-append) is skipped with a
/// warning by `plot` and `table` and cut on resume; a run killed before its
/// first checkpoint starts again from step 0 with the same command (or with
/// `--resume`), and both end in the uninterrupted run's metrics.
#[test]
fn torn_lines_are_cut_and_a_run_without_a_checkpoint_starts_again() {
    let tmp = tempdir("torn");
    let cfg = tmp.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let expected = uninterrupted(&tmp, &cfg);

    for (name, resume) in [("again", false), ("resumed", true)] {
        let run = tmp.join(name);
        let mut child = train(&cfg, &run, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let m = run.join("metrics.jsonl");
        wait_for("the first metrics line", || std::fs::read_to_string(&m).is_ok_and(|t| t.lines().count() >= 1));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!run.join("checkpoints").join("step-0000000600").exists(), "killed too late");
        let mut text = std::fs::read_to_string(&m).unwrap();
        text.push_str("{\"env_steps\": 30");
        std::fs::write(&m, &text).unwrap();

        let o = ddppo(&["plot", s(&run), "--out", s(&tmp.join(format!("{name}.svg")))]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stderr).contains("torn last line"));
        let o = ddppo(&["table", s(&run), "--at", "0"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stderr).contains("torn last line"));

        let o = if resume {
            ddppo(&["train", "--resume", s(&run)])
        } else {
            train(&cfg, &run, &[]).output().unwrap()
        };
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains("cutting a torn last line") && err.contains("from step 0"), "{err}");
        assert_eq!(metrics(&run), expected, "{name}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
