//! Runs that nothing can break (one rule for an unfinished run directory):
//! a run killed with SIGKILL at many seeded points, checkpoint writes
//! included, and stopped with SIGTERM, SIGINT or SIGUSR1, ends — after the
//! same command is run again each time — with the metrics of the
//! uninterrupted run, bit for bit apart from the wall-clock fields.

mod common;

use common::{TINY, metrics, s};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The tiny run of `common`, twice as long: eight checkpoints to kill around.
fn tiny() -> String {
    TINY.replace("epoch_length = 600", "epoch_length = 1200")
}

fn tempdir(name: &str) -> PathBuf {
    common::tempdir("kill", name)
}

/// `ddppo train --config CFG --out DIR`: the command a user (or a requeued
/// cluster job) runs again unchanged.
fn train(cfg: &Path, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ddppo"));
    c.args(["train", "--config", s(cfg), "--out", s(out)]).env("RAYON_NUM_THREADS", "1");
    c
}

fn spawn(cfg: &Path, out: &Path) -> Child {
    train(cfg, out).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

fn finish(cfg: &Path, out: &Path) -> Output {
    let o = train(cfg, out).output().unwrap();
    assert!(o.status.success(), "the continued run failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

fn tmp_checkpoint_exists(run: &Path) -> bool {
    std::fs::read_dir(run.join("checkpoints"))
        .map(|r| r.flatten().any(|e| e.file_name().to_string_lossy().starts_with(".tmp-")))
        .unwrap_or(false)
}

/// A small seeded generator (splitmix64) for the kill points.
struct Points(u64);
impl Points {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The uninterrupted run: its metrics and its wall time.
fn uninterrupted(tmp: &Path, cfg: &Path) -> (Vec<serde_json::Value>, Duration) {
    let full = tmp.join("full");
    let t = Instant::now();
    finish(cfg, &full);
    let took = t.elapsed();
    let m = metrics(&full);
    assert_eq!(m.len(), 9, "evaluations at 0, 150, ..., 1200");
    (m, took)
}

/// Ten SIGKILLs at seeded points of one run (seven at random times, three
/// as soon as a checkpoint is being written), each followed by the same
/// command again; then the run is let finish.
fn kill_points(name: &str, toml: &str, seed: u64) {
    let tmp = tempdir(name);
    let cfg = tmp.join("tiny.toml");
    std::fs::write(&cfg, toml).unwrap();
    let (expected, took) = uninterrupted(&tmp, &cfg);
    let run = tmp.join("killed");
    let mut points = Points(seed);
    let mut mid_write = 0;
    let mut killed = 0;
    for k in 0..10 {
        // Kill points 2, 5 and 8 aim at a checkpoint write: killed as soon as
        // a temporary checkpoint shows (tried again, up to 5 times, when the
        // write was over before the kill landed: the machine may be busy).
        let tries = if k % 3 == 2 { 5 } else { 1 };
        for _ in 0..tries {
            let mut child = spawn(&cfg, &run);
            if k % 3 == 2 {
                let t = Instant::now();
                while !tmp_checkpoint_exists(&run) && t.elapsed() < took * 2 {
                    if child.try_wait().unwrap().is_some() {
                        break;
                    }
                    std::hint::spin_loop();
                }
            } else {
                std::thread::sleep(took.mul_f64(points.next() * 0.15));
            }
            let _ = child.kill();
            let status = child.wait().unwrap();
            // A run that finished before its kill point is complete: nothing is lost either.
            assert!(status.success() || status.code().is_none(), "kill {k}: {status}");
            killed += usize::from(status.code().is_none());
            if k % 3 == 2 && tmp_checkpoint_exists(&run) {
                mid_write += 1;
                break;
            }
        }
    }
    let o = finish(&cfg, &run);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(metrics(&run), expected, "after 10 kills the run differs from the uninterrupted one: {err}");
    assert!(mid_write >= 1, "no kill landed inside a checkpoint write");
    assert!(killed >= 8, "only {killed} kills landed before the run was complete");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn ten_sigkills_at_seeded_points_end_in_the_uninterrupted_metrics_pendulum() {
    kill_points("pendulum", &tiny(), 11);
}

#[test]
fn ten_sigkills_at_seeded_points_end_in_the_uninterrupted_metrics_inverted_pendulum() {
    kill_points("ip", &tiny().replace("task = \"pendulum\"", "task = \"inverted-pendulum\""), 12);
}

/// SIGTERM, SIGINT and SIGUSR1 (Slurm's signals): a checkpoint within 20 s,
/// exit code 75, and the same command again continues bit for bit. The last
/// stop gets two signals in a row: the second must not spoil the checkpoint.
#[test]
fn signals_checkpoint_and_exit_75_and_the_run_continues_identically() {
    let tmp = tempdir("signals");
    let cfg = tmp.join("tiny.toml");
    std::fs::write(&cfg, tiny()).unwrap();
    let (expected, took) = uninterrupted(&tmp, &cfg);
    let run = tmp.join("signalled");
    let mut points = Points(7);
    let mut stopped = 0;
    for (k, sig) in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGTERM].into_iter().enumerate() {
        let child = spawn(&cfg, &run);
        std::thread::sleep(took.mul_f64(0.15 + 0.25 * points.next()));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, sig) };
        if k == 3 {
            std::thread::sleep(Duration::from_millis(30));
            unsafe { libc::kill(child.id() as i32, sig) };
        }
        let t = Instant::now();
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(t.elapsed() < Duration::from_secs(20), "signal {sig}: exit after {:?}", t.elapsed());
        match o.status.code() {
            Some(75) => {
                stopped += 1;
                assert!(err.contains("resumable"), "{err}");
                assert!(!err.contains("panicked"), "{err}");
            }
            Some(0) => {}
            other => panic!("signal {sig}: exit {other:?}: {err}"),
        }
    }
    assert!(stopped >= 3, "only {stopped} of 4 signals landed before the run finished");
    finish(&cfg, &run);
    assert_eq!(metrics(&run), expected, "the signalled run differs from the uninterrupted one");
    let _ = std::fs::remove_dir_all(&tmp);
}
