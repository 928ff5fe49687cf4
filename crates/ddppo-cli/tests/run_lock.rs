//! One owner per run directory, torn metrics lines, and a run killed before
//! its first checkpoint: never a dead end, never lost data.

mod common;

use common::{ddppo, metrics, s, wait_for};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn tempdir(name: &str) -> PathBuf {
    common::tempdir("lock", name)
}

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

fn train(cfg: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ddppo"));
    c.args(["train", "--config", s(cfg), "--out", s(out)]).args(extra).env("RAYON_NUM_THREADS", "1");
    c
}

fn uninterrupted(tmp: &Path, cfg: &Path) -> Vec<serde_json::Value> {
    let full = tmp.join("full");
    let o = train(cfg, &full, &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = metrics(&full);
    assert_eq!(m.len(), 5);
    m
}

/// A second process on a held run directory (the same command, or
/// `--resume`) waits up to `--lock-wait`, then refuses with one line naming
/// the holder; the kernel releases a killed holder's lock; a waiting process
/// goes on when the holder lets go. A requeued job that starts while its
/// predecessor still checkpoints waits for it and continues.
#[test]
fn a_second_process_on_a_run_directory_waits_then_refuses_naming_the_holder() {
    let tmp = tempdir("lock");
    let cfg = tmp.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let expected = uninterrupted(&tmp, &cfg);

    // A run killed early, whose lock this test then holds (as a running
    // process would: the lock file names the holder).
    let run = tmp.join("run");
    let mut first = train(&cfg, &run, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let lock = run.join("lock");
    wait_for("the first run's config", || run.join("config.toml").exists());
    first.kill().unwrap();
    first.wait().unwrap();
    let mut holder = std::fs::OpenOptions::new().write(true).open(&lock).unwrap();
    holder.try_lock().expect("the killed run's lock was released by the kernel");
    let me = format!("test-host pid {}", std::process::id());
    holder.set_len(0).unwrap();
    std::io::Write::write_all(&mut holder, me.as_bytes()).unwrap();

    let t = std::time::Instant::now();
    let o = train(&cfg, &run, &["--lock-wait", "1"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(t.elapsed() >= std::time::Duration::from_secs(1), "did not wait");
    let last = err.trim().lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("error: ") && last.contains(&me), "{err}");
    let o = ddppo(&["train", "--resume", s(&run), "--lock-wait", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by") && err.contains(&me) && err.trim().lines().count() == 1, "{err}");

    // A waiting process goes on once the holder lets go, and the run ends as
    // the uninterrupted one.
    let mut waiter =
        train(&cfg, &run, &["--lock-wait", "120"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(waiter.try_wait().unwrap().is_none(), "the waiter did not wait for the lock");
    drop(holder);
    assert!(waiter.wait().unwrap().success());
    assert_eq!(metrics(&run), expected);

    let run = tmp.join("requeued");
    let first = train(&cfg, &run, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let lock = run.join("lock");
    wait_for("the first run's lock", || std::fs::read_to_string(&lock).is_ok_and(|t| t.contains("pid")));
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

        let o = if resume { ddppo(&["train", "--resume", s(&run)]) } else { train(&cfg, &run, &[]).output().unwrap() };
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains("cutting a torn last line") && err.contains("from step 0"), "{err}");
        assert_eq!(metrics(&run), expected, "{name}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `cmd` with its files limited to `bytes` (RLIMIT_FSIZE, SIGXFSZ ignored):
/// a write past the limit fails with EFBIG, as on a full disk.
fn with_file_limit(cmd: &mut Command, bytes: u64) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit and signal are async-signal-safe; nothing else runs here.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        })
    }
}

/// A full disk: an append of a metrics line that fails is cut back (no torn
/// line), the run stops with one line naming the file, and the same command
/// later continues; a `--resume` that cannot rewrite the metrics leaves no
/// temporary file behind and names the file.
#[test]
fn a_full_disk_leaves_no_torn_line_and_no_temporary_file() {
    let tmp = tempdir("full");
    let cfg = tmp.join("tiny.toml");
    std::fs::write(&cfg, TINY.replace("checkpoint_every = 600", "checkpoint_every = 0")).unwrap();
    let full = tmp.join("full");
    let o = train(&cfg, &full, &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let expected = metrics(&full);
    let line = std::fs::metadata(full.join("metrics.jsonl")).unwrap().len() / expected.len() as u64;

    // Room for two and a half metrics lines.
    let run = tmp.join("run");
    let o = with_file_limit(&mut train(&cfg, &run, &[]), line * 5 / 2).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    // The first file to fill up (TensorBoard's, written before each metrics line) is named.
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(last.starts_with("error: cannot ") && last.contains(s(&run)) && last.contains("too large"), "{err}");
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines = text.lines().count();
    assert!(text.ends_with('\n') && (1..expected.len()).contains(&lines), "{text}");
    let o = train(&cfg, &run, &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(metrics(&run), expected);

    // `--resume` of a run (killed after its checkpoint at 600) whose metrics
    // no longer fit: refused naming the file, no metrics.tmp left.
    std::fs::write(&cfg, TINY).unwrap();
    let cut = tmp.join("cut");
    let mut child = train(&cfg, &cut, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let marker = cut.join("checkpoints").join("step-0000000600");
    wait_for("the checkpoint at 600", || marker.exists());
    child.kill().unwrap();
    child.wait().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ddppo"));
    cmd.args(["train", "--resume", s(&cut)]);
    let o = with_file_limit(&mut cmd, 200).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.trim().lines().last().unwrap_or_default().contains("metrics.jsonl"), "{err}");
    assert!(!cut.join("metrics.tmp").exists() && !cut.join("metrics.csv.tmp").exists());
    let _ = std::fs::remove_dir_all(&tmp);
}
