//! TensorBoard event files, read back with TensorBoard's own Python reader:
//! a run killed (SIGKILL) after a checkpoint, requeued, stopped (SIGTERM) and
//! resumed has one curve per numeric field of `metrics.jsonl`, equal to it,
//! each step once and in order.
//!
//! The reader runs in `.cache/venv-tb` (tensorboard pinned), which the test
//! makes with `python3 -m venv` and pip when it is missing; where it cannot,
//! the test fails saying why.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The pinned tensorboard of `.cache/venv-tb`.
const TENSORBOARD_VERSION: &str = "2.21.0";

/// The tiny Pendulum run of `tests/resume.rs` (every phase of Algorithm 1),
/// evaluated every 150 steps, with one checkpoint at 300 before the end.
const TINY: &str = r#"
task = "pendulum"
variant = "ddppo"
seed = 5
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
checkpoint_every = 300

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

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The last non-empty line of a command's stderr, for a one-line failure.
fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

/// `.cache/venv-tb/bin/python` with the pinned tensorboard, made on first
/// use (or remade when it holds another version). The venv is built under a
/// temporary name and renamed when complete, so an interrupted install is
/// never taken for a finished one.
fn tensorboard_python() -> PathBuf {
    let cache = workspace_root().join(".cache");
    let venv = cache.join("venv-tb");
    let python = venv.join("bin/python");
    let imports = |python: &Path| {
        Command::new(python)
            .args([
                "-c",
                &format!("import sys, tensorboard; sys.exit(tensorboard.__version__ != '{TENSORBOARD_VERSION}')"),
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if imports(&python) {
        return python;
    }
    let started = Instant::now();
    let pin = format!("tensorboard=={TENSORBOARD_VERSION}");
    let tmp = cache.join(format!("venv-tb.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let run = |cmd: &mut Command, what: &str| match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!("{what} failed: {}", last_line(&o.stderr))),
        Err(e) => Err(format!("{what} did not start: {e}")),
    };
    let made = std::fs::create_dir_all(&cache)
        .map_err(|e| format!("cannot create .cache: {e}"))
        .and_then(|()| run(Command::new("python3").args(["-m", "venv"]).arg(&tmp), "python3 -m venv"))
        .and_then(|()| {
            run(
                Command::new(tmp.join("bin/python")).args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    &pin,
                ]),
                &format!("pip install {pin}"),
            )
        });
    if let Err(why) = made {
        let _ = std::fs::remove_dir_all(&tmp);
        panic!("cannot make .cache/venv-tb: {why}");
    }
    let _ = std::fs::remove_dir_all(&venv);
    std::fs::rename(&tmp, &venv)
        .unwrap_or_else(|e| panic!("cannot make .cache/venv-tb: cannot rename {}: {e}", tmp.display()));
    assert!(imports(&python), "cannot make .cache/venv-tb: tensorboard does not import after the install");
    eprintln!("made .cache/venv-tb ({pin}) in {:.0} s", started.elapsed().as_secs_f64());
    python
}

/// What TensorBoard reads from `tb` (see read_tensorboard.py).
fn read_tb(python: &Path, tb: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/read_tensorboard.py");
    let o = Command::new(python).arg(script).arg(tb).output().unwrap();
    assert!(
        o.status.success(),
        "TensorBoard's reader failed on {}: {}",
        tb.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn metrics(run: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The numeric fields of a metrics record, nested ones as `outer/inner`,
/// rounded to TensorBoard's float32 scalars.
fn scalars(v: &Value) -> BTreeMap<String, f64> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, f64>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    walk(&if prefix.is_empty() { k.clone() } else { format!("{prefix}/{k}") }, v, out);
                }
            }
            Value::Number(n) => {
                out.insert(prefix.to_string(), n.as_f64().unwrap() as f32 as f64);
            }
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    walk("", v, &mut out);
    out
}

/// The scalar events of a read, each `(step, tag -> value)`, in file order.
fn events(read: &Value) -> Vec<(u64, BTreeMap<String, f64>)> {
    let all = read["events"].as_array().unwrap();
    assert_eq!(all[0]["file_version"], "brain.Event:2", "{}", all[0]);
    let versions = all.iter().filter(|e| e.get("file_version").is_some()).count();
    assert_eq!(versions, 1, "one file_version event (one file, written once): {}", read["files"]);
    all[1..]
        .iter()
        .map(|e| {
            let values =
                e["values"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_f64().unwrap())).collect();
            (e["step"].as_u64().unwrap(), values)
        })
        .collect()
}

/// The event files hold exactly the records of `metrics.jsonl`, in order,
/// and TensorBoard's dashboard reader shows the same curves.
fn assert_tb_equals_metrics(read: &Value, metrics: &[Value]) {
    let evs = events(read);
    let steps: Vec<u64> = evs.iter().map(|(s, _)| *s).collect();
    let want_steps: Vec<u64> = metrics.iter().map(|m| m["env_steps"].as_u64().unwrap()).collect();
    assert_eq!(steps, want_steps, "event steps against metrics.jsonl");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "steps not strictly increasing: {steps:?}");
    for ((step, values), m) in evs.iter().zip(metrics) {
        assert_eq!(values, &scalars(m), "values at step {step}");
    }
    let wall: Vec<f64> = read["events"].as_array().unwrap().iter().map(|e| e["wall_time"].as_f64().unwrap()).collect();
    assert!(wall[0] > 1.6e9, "wall_time is not a Unix time: {}", wall[0]);
    assert!(wall[1..].windows(2).all(|w| w[0] <= w[1]), "wall times go back: {wall:?}");

    let mut curves: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for m in metrics {
        for (tag, x) in scalars(m) {
            curves.entry(tag).or_default().push((m["env_steps"].as_u64().unwrap(), x));
        }
    }
    let shown: BTreeMap<String, Vec<(u64, f64)>> = read["scalars"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(tag, pts)| {
            let pts =
                pts.as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap())).collect();
            (tag.clone(), pts)
        })
        .collect();
    let tags = |c: &BTreeMap<String, Vec<(u64, f64)>>| c.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(tags(&shown), tags(&curves), "EventAccumulator's tags");
    assert_eq!(shown, curves, "EventAccumulator's curves");
}

#[test]
fn interrupted_and_resumed_run_has_tensorboard_curves_equal_to_its_metrics() {
    let python = tensorboard_python();
    let tmp = std::env::temp_dir().join(format!("ddppo-tb-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let cfg = tmp.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let run = tmp.join("run");

    // Killed (SIGKILL) once its evaluation at 450 is written: after the
    // checkpoint at 300, so the resumed run writes the step 450 again.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ddppo"))
        .args(["train", "--config", cfg.to_str().unwrap(), "--out", run.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let at_450 = || {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .is_ok_and(|t| t.lines().any(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["env_steps"] == 450)))
    };
    while !at_450() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before its evaluation at step 450");
        }
        assert!(started.elapsed() < Duration::from_secs(600), "no evaluation at step 450 after 10 minutes");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = metrics(&run);
    assert_eq!(before.last().unwrap()["env_steps"], 450, "the run was not interrupted at 450");
    assert!(run.join("checkpoints/step-0000000300").is_dir());
    // The killed run's events already hold step 450.
    assert_tb_equals_metrics(&read_tb(&python, &run.join("tb")), &before);

    // The same command again (a requeued job) continues from the checkpoint
    // at 300. Stopped by SIGTERM as soon as it has cut metrics.jsonl back to
    // there, it checkpoints where it is and exits 75.
    let mut child = Command::new(env!("CARGO_BIN_EXE_ddppo"))
        .args(["train", "--config", cfg.to_str().unwrap(), "--out", run.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = || std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count());
    while lines() != 3 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the requeued run ended ({status}) before cutting its metrics back to step 300");
        }
        assert!(started.elapsed() < Duration::from_secs(600), "metrics not cut back after 10 minutes");
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(75), "a run stopped by SIGTERM exits 75");
    let mid = metrics(&run);
    assert!(mid.len() >= 3 && mid[..3] == before[..3], "the requeued run kept the records to step 300");
    assert_tb_equals_metrics(&read_tb(&python, &run.join("tb")), &mid);

    let o =
        Command::new(env!("CARGO_BIN_EXE_ddppo")).args(["train", "--resume", run.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = metrics(&run);
    let steps: Vec<u64> = after.iter().map(|m| m["env_steps"].as_u64().unwrap()).collect();
    assert_eq!(steps, [0, 150, 300, 450, 600]);
    // The evaluation at 450 was done again (its wall-clock fields differ).
    assert_ne!(after[3]["wall_s"], before[3]["wall_s"]);
    assert!(after.iter().any(|m| m["grad_loss"].is_number()) && after[0]["grad_loss"].is_null());

    let read = read_tb(&python, &run.join("tb"));
    assert_eq!(read["files"].as_array().unwrap().len(), 1, "one event file after the resume: {}", read["files"]);
    assert_tb_equals_metrics(&read, &after);
    let _ = std::fs::remove_dir_all(&tmp);
}
