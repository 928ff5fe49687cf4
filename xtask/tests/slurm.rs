//! `cargo xtask ablate --slurm` on a real Slurm: Debian's slurm-wlm (22.05)
//! and munge, installed with apt-get when absent, run as a one-node cluster
//! on this machine (slurmctld, slurmd and munged on localhost, their config,
//! state and logs in a temporary directory; no cgroups). A two-task array of
//! tiny Pendulum runs goes through the generated `sweep.sbatch`; one task is
//! requeued mid-run with `scontrol requeue` (SIGTERM to the job), the other
//! gets the time-limit warning (`scancel --batch --signal=USR1`, what
//! `--signal=B:USR1@120` sends) and must requeue itself. Both must end with
//! the same `metrics.jsonl` as uninterrupted local runs, apart from the
//! wall-clock fields.
//!
//! Never skipped: where Slurm cannot be installed or started the test fails
//! with one line saying why. It needs root, as CI has.

mod common;
use common::ddppo_binary;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A small DDPPO run on Pendulum (the tiny config of
/// crates/ddppo-cli/tests/resume.rs over 5 epochs): warm-up, model trainings
/// every 150 steps with rollouts, an evaluation and a checkpoint every 300;
/// about 16 s of one core, so that a signal after the first checkpoint comes
/// mid-run.
const TINY: &str = r#"
task = "pendulum"
variant = "ddppo"
seed = 3
epochs = 5
epoch_length = 600
start_steps = 300
min_pool_size = 300
model_train_freq = 150
rollout_batch_size = 300
policy_updates_per_step = 1
critic_updates_per_step = 1
batch_size = 32
hidden = [32, 32]
eval_every = 300
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

/// The variant compared with ddppo: array task 0 is ddppo, task 1 this one.
const OTHER: &str = "no-grad-loss";

/// Everything Slurm-related must be over within this time.
const DEADLINE: Duration = Duration::from_secs(270);

const DAEMONS: [&str; 3] = ["munged", "slurmctld", "slurmd"];
const CLIENTS: [&str; 5] = ["sbatch", "scontrol", "scancel", "squeue", "sinfo"];

fn fail(why: &str) -> ! {
    panic!("{why}");
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Installs slurm-wlm and munge with apt-get when a program is missing.
fn ensure_installed() {
    if DAEMONS.iter().chain(CLIENTS.iter()).all(|p| find_program(p).is_some()) {
        return;
    }
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if uid.as_deref().ok() != Some("0") {
        fail("cannot install slurm-wlm and munge: not root (apt-get install slurm-wlm munge, or run as root)");
    }
    if find_program("apt-get").is_none() {
        fail("cannot install slurm-wlm and munge: no apt-get on this machine");
    }
    let apt = |args: &[&str]| {
        let o = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .unwrap_or_else(|e| fail(&format!("cannot run apt-get: {e}")));
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            fail(&format!("cannot install slurm-wlm and munge: apt-get {} failed: {last}", args[0]));
        }
    };
    let t = Instant::now();
    apt(&["update", "-qq"]);
    apt(&["install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]);
    eprintln!("installed slurm-wlm and munge in {:.1} s", t.elapsed().as_secs_f64());
    for p in DAEMONS.iter().chain(CLIENTS.iter()) {
        if find_program(p).is_none() {
            fail(&format!("slurm-wlm and munge are installed but {p} is missing"));
        }
    }
}

fn free_port(held: &mut Vec<TcpListener>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    held.push(l);
    port
}

/// The one-node cluster; dropping it cancels its jobs and stops the daemons.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
    daemons: Vec<(&'static str, Child)>,
    jobs: Vec<String>,
    /// Job logs shown when the test fails.
    job_logs: Vec<PathBuf>,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let started = Instant::now();
        let dir = dir.join("slurm");
        for d in ["munge", "state", "spool", "log"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let mut cluster = Cluster {
            conf: dir.join("slurm.conf"),
            dir: dir.clone(),
            daemons: Vec::new(),
            jobs: Vec::new(),
            job_logs: Vec::new(),
        };
        let p = |rel: &str| dir.join(rel).to_str().unwrap().to_string();

        // munge: a fresh key readable by its owner only (munged refuses others).
        use std::os::unix::fs::PermissionsExt;
        let mut key = vec![0u8; 1024];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut key).unwrap();
        std::fs::write(dir.join("munge/munge.key"), key).unwrap();
        std::fs::set_permissions(dir.join("munge/munge.key"), std::fs::Permissions::from_mode(0o400)).unwrap();
        std::fs::set_permissions(dir.join("munge"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let socket = p("munge/munge.socket");
        // --force: munged refuses to run as root, and from a world-writable /tmp, without it.
        cluster.spawn(
            "munged",
            Command::new(find_program("munged").unwrap()).args([
                "--foreground",
                "--force",
                &format!("--socket={socket}"),
                &format!("--key-file={}", p("munge/munge.key")),
                &format!("--log-file={}", p("log/munged.log")),
                &format!("--pid-file={}", p("munge/munged.pid")),
                &format!("--seed-file={}", p("munge/munged.seed")),
            ]),
        );
        let t = Instant::now();
        while !Path::new(&socket).exists() {
            if t.elapsed() > Duration::from_secs(15) {
                cluster.fail_with_logs("munged did not create its socket within 15 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }

        let user = String::from_utf8_lossy(&Command::new("id").arg("-un").output().unwrap().stdout).trim().to_string();
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kb: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(1 << 20);
        // Below the real size: a node that reports less than its config is drained.
        let mem_mb = mem_kb / 1024 * 9 / 10;
        let mut held = Vec::new();
        let (ctld_port, d_port) = (free_port(&mut held), free_port(&mut held));
        drop(held);
        let conf = format!(
            "ClusterName=ddppotest\n\
             SlurmctldHost=localhost(127.0.0.1)\n\
             SlurmctldPort={ctld_port}\n\
             SlurmdPort={d_port}\n\
             SlurmUser={user}\n\
             SlurmdUser={user}\n\
             AuthType=auth/munge\n\
             CredType=cred/munge\n\
             AuthInfo=socket={socket}\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             SelectType=select/cons_tres\n\
             SelectTypeParameters=CR_CPU\n\
             MpiDefault=none\n\
             ReturnToService=2\n\
             MailProg=/bin/true\n\
             StateSaveLocation={state}\n\
             SlurmdSpoolDir={spool}\n\
             SlurmctldPidFile={ctld_pid}\n\
             SlurmdPidFile={d_pid}\n\
             SlurmctldLogFile={ctld_log}\n\
             SlurmdLogFile={d_log}\n\
             JobCompType=jobcomp/none\n\
             AccountingStorageType=accounting_storage/none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             NodeName=ddppotest NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN\n\
             PartitionName=debug Nodes=ddppotest Default=YES MaxTime=INFINITE State=UP\n",
            state = p("state"),
            spool = p("spool"),
            ctld_pid = p("slurmctld.pid"),
            d_pid = p("slurmd.pid"),
            ctld_log = p("log/slurmctld.log"),
            d_log = p("log/slurmd.log"),
        );
        std::fs::write(&cluster.conf, conf).unwrap();
        let conf = cluster.conf.to_str().unwrap().to_string();
        cluster.spawn("slurmctld", Command::new(find_program("slurmctld").unwrap()).args(["-D", "-f", &conf]));
        cluster.spawn(
            "slurmd",
            Command::new(find_program("slurmd").unwrap()).args(["-D", "-N", "ddppotest", "-f", &conf]),
        );
        let t = Instant::now();
        loop {
            let state = cluster.client("sinfo", &["-h", "-o", "%T"]);
            let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
            if state == "idle" {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                cluster.fail_with_logs(&format!("the node is not idle 60 s after start (sinfo: '{state}')"));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        eprintln!("munged, slurmctld and slurmd up in {:.1} s", started.elapsed().as_secs_f64());
        cluster
    }

    fn spawn(&mut self, name: &'static str, cmd: &mut Command) {
        let log = std::fs::File::create(self.dir.join("log").join(format!("{name}.stdout"))).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| fail(&format!("cannot start {name}: {e}")));
        self.daemons.push((name, child));
        std::thread::sleep(Duration::from_millis(300));
        if let Some(st) = self.daemons.last_mut().unwrap().1.try_wait().unwrap() {
            self.fail_with_logs(&format!("{name} exited at start ({st})"));
        }
    }

    /// A Slurm client command against this cluster.
    fn client(&self, name: &str, args: &[&str]) -> Output {
        Command::new(find_program(name).unwrap())
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .output()
            .unwrap_or_else(|e| fail(&format!("cannot run {name}: {e}")))
    }

    /// `scontrol show job` of one array task as key=value pairs.
    fn job(&self, id: &str) -> std::collections::HashMap<String, String> {
        let o = self.client("scontrol", &["-o", "show", "job", id]);
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn fail_with_logs(&self, why: &str) -> ! {
        for name in
            ["log/slurmctld.log", "log/slurmd.log", "log/munged.log", "log/slurmctld.stdout", "log/slurmd.stdout"]
        {
            if let Ok(text) = std::fs::read_to_string(self.dir.join(name)) {
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- {name} (last lines)\n{}", lines[lines.len().saturating_sub(15)..].join("\n"));
            }
        }
        for path in &self.job_logs {
            if let Ok(text) = std::fs::read_to_string(path) {
                eprintln!("--- {}\n{text}", path.display());
            }
        }
        eprintln!("(files kept in {})", self.dir.parent().unwrap_or(&self.dir).display());
        fail(why)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Jobs first, while slurmd can still end them cleanly.
        for j in &self.jobs {
            let _ = self.client("scancel", &[j]);
        }
        let t = Instant::now();
        while !self.jobs.is_empty() && t.elapsed() < Duration::from_secs(40) {
            let q = self.client("squeue", &["-h"]);
            if !q.status.success() || q.stdout.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        for (_, child) in self.daemons.iter_mut().rev() {
            // SIGTERM: each daemon saves its state and exits.
            send_signal(child.id(), 15);
        }
        for (name, child) in self.daemons.iter_mut().rev() {
            let t = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if t.elapsed() > Duration::from_secs(10) {
                    eprintln!("{name} ignored SIGTERM; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // A task's ddppo that outlived its job (the test failed mid-run):
        // found by the test's own directory on its command line.
        let Some(tmp) = self.dir.parent().and_then(Path::to_str) else { return };
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if pid != std::process::id() && String::from_utf8_lossy(&cmdline).contains(tmp) {
                send_signal(pid, 9);
            }
        }
    }
}

/// `kill -SIG PID` without a libc dependency.
fn send_signal(pid: u32, sig: i32) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// The metrics lines without their wall-clock fields.
fn metrics(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
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

/// Asks the binary (`ddppo checkpoint latest`), which knows how checkpoints are named.
fn has_checkpoint(ddppo: &Path, run: &Path) -> bool {
    Command::new(ddppo).args(["checkpoint", "latest"]).arg(run).output().is_ok_and(|o| o.status.success())
}

fn wait_for(what: &str, started: Instant, cluster: &Cluster, mut done: impl FnMut() -> bool) {
    while !done() {
        if started.elapsed() > DEADLINE {
            cluster.fail_with_logs(&format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn requeued_array_tasks_match_uninterrupted_runs() {
    let t_install = Instant::now();
    ensure_installed();
    let install_s = t_install.elapsed().as_secs_f64();
    let ddppo = ddppo_binary();
    let started = Instant::now();

    let tmp = std::env::temp_dir().join(format!("ddppo-slurm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let cfg = tmp.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let mut cluster = Cluster::start(&tmp);

    // The reference: the same two runs, locally and uninterrupted.
    let local = tmp.join("local");
    let reference: Vec<(PathBuf, Child)> = ["ddppo", OTHER]
        .iter()
        .map(|v| {
            let dir = local.join(format!("pendulum-{v}-s0"));
            let child = Command::new(&ddppo)
                .args(["train", "--env", "pendulum", "--variant", v, "--seed", "0", "--config"])
                .arg(&cfg)
                .arg("--out")
                .arg(&dir)
                .env("RAYON_NUM_THREADS", "1")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (dir, child)
        })
        .collect();

    // Generate and submit through xtask, as a user would.
    let sweep = tmp.join("sweep");
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["ablate", OTHER, "--env", "pendulum", "--seeds", "1", "--slurm", "--cpus", "1", "--config"])
        .arg(&cfg)
        .arg("--ddppo")
        .arg(&ddppo)
        .arg("--out")
        .arg(&sweep)
        .env("CARGO_MANIFEST_DIR", env!("CARGO_MANIFEST_DIR"))
        .env("SLURM_CONF", &cluster.conf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "xtask ablate --slurm failed: {}{stdout}", String::from_utf8_lossy(&o.stderr));
    let job = stdout
        .lines()
        .find_map(|l| l.strip_prefix("submitted job array "))
        .unwrap_or_else(|| panic!("no job id in: {stdout}"))
        .trim()
        .to_string();
    cluster.jobs.push(job.clone());
    for i in 0..2 {
        cluster.job_logs.extend(["out", "err"].map(|ext| sweep.join(format!("task-{i}.{ext}"))));
    }
    let script = std::fs::read_to_string(sweep.join("sweep.sbatch")).unwrap();
    assert!(script.contains("#SBATCH --array=0-1") && script.contains(&ddppo.display().to_string()));
    let runs = [sweep.join("pendulum-ddppo-s0"), sweep.join(format!("pendulum-{OTHER}-s0"))];
    let task = |i: usize| format!("{job}_{i}");
    // `--collect`: the comparison table of the runs as far as they are.
    let collect = || -> String {
        let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["ablate", OTHER, "--env", "pendulum", "--seeds", "1", "--collect", "--ddppo"])
            .arg(&ddppo)
            .arg("--out")
            .arg(&sweep)
            .env("CARGO_MANIFEST_DIR", env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(o.status.success(), "xtask ablate --collect: {}", String::from_utf8_lossy(&o.stderr));
        assert!(sweep.join("comparison.svg").is_file());
        let table = std::fs::read_to_string(sweep.join("table.md")).unwrap();
        for v in ["ddppo", OTHER] {
            assert!(table.contains(&format!("| pendulum | {v} | 1 |")), "no row for {v}:\n{table}");
        }
        table
    };

    // Mid-run: after each run's first checkpoint, before its end.
    wait_for("the first checkpoint of task 0", started, &cluster, || has_checkpoint(&ddppo, &runs[0]));
    let o = cluster.client("scontrol", &["requeue", &task(0)]);
    assert!(o.status.success(), "scontrol requeue: {}", String::from_utf8_lossy(&o.stderr));
    wait_for("the first checkpoint of task 1", started, &cluster, || has_checkpoint(&ddppo, &runs[1]));
    let o = cluster.client("scancel", &["--batch", "--signal=USR1", &task(1)]);
    assert!(o.status.success(), "scancel --signal=USR1: {}", String::from_utf8_lossy(&o.stderr));
    let partial = collect();
    assert!(!partial.contains("3000 steps"), "the runs were not partial:\n{partial}");

    // Slurm holds a requeued job for two minutes (its BeginTime); let both
    // start again after 3 s instead. Not at once: slurmd refuses a launch
    // whose credential dates from the second in which the job was killed
    // ("Job credential revoked"), which fails the job.
    for i in 0..2 {
        wait_for(&format!("task {i} to be requeued"), started, &cluster, || {
            let j = cluster.job(&task(i));
            let state = j.get("JobState").map(String::as_str).unwrap_or("");
            if matches!(state, "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT") {
                cluster.fail_with_logs(&format!("task {i} ended ({state}) instead of being requeued"));
            }
            state == "PENDING" && j.get("Restarts").is_some_and(|r| r != "0")
        });
        std::thread::sleep(Duration::from_secs(3));
        let o = cluster.client("scontrol", &["update", &format!("jobid={}", task(i)), "StartTime=now"]);
        assert!(o.status.success(), "scontrol update: {}", String::from_utf8_lossy(&o.stderr));
    }
    for (i, run) in runs.iter().enumerate() {
        wait_for(&format!("task {i} to finish"), started, &cluster, || {
            let j = cluster.job(&task(i));
            matches!(j.get("JobState").map(String::as_str), Some("COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT"))
        });
        let j = cluster.job(&task(i));
        let log = std::fs::read_to_string(sweep.join(format!("task-{i}.out"))).unwrap_or_default();
        let err = std::fs::read_to_string(sweep.join(format!("task-{i}.err"))).unwrap_or_default();
        assert_eq!(j["JobState"], "COMPLETED", "task {i}: {j:?}\n{log}\n{err}");
        assert_eq!(j["Restarts"], "1", "task {i} ran once more after its interruption: {j:?}\n{log}\n{err}");
        // The first start was interrupted with a checkpoint (exit 75); the second finished.
        assert!(log.contains("start 1 on") && log.contains("start 2 on"), "task {i}:\n{log}");
        assert!(log.contains("ddppo train exited 75"), "task {i} was not interrupted mid-run:\n{log}\n{err}");
        assert!(log.contains("ddppo train exited 0"), "task {i}:\n{log}\n{err}");
        // Continued from the checkpoint of the interruption, not started again
        // (which would write the same metrics too).
        let resumed = format!("resuming {} from {}", run.display(), run.join("checkpoints").display());
        assert!(err.contains(&resumed), "task {i} did not continue its run:\n{err}");
    }
    let log1 = std::fs::read_to_string(sweep.join("task-1.out")).unwrap();
    assert!(log1.contains("requeueing it"), "task 1 did not requeue itself after the warning:\n{log1}");
    let log0 = std::fs::read_to_string(sweep.join("task-0.out")).unwrap();
    assert!(!log0.contains("requeueing it"), "task 0 was requeued by Slurm, not by itself:\n{log0}");
    let slurm_s = started.elapsed().as_secs_f64();
    let table = collect();
    assert!(table.contains("3000 steps"), "{table}");
    eprintln!("--- task-0.out\n{log0}--- task-1.out\n{log1}");

    for ((dir, mut child), run) in reference.into_iter().zip(&runs) {
        let st = child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(st.success(), "local run {}: {err}", dir.display());
        let expected = metrics(&dir);
        assert_eq!(expected.len(), 11, "evaluations at 0, 300, ..., 3000");
        let got = metrics(run);
        assert_eq!(got.len(), expected.len(), "{}: metrics lines", run.display());
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(g, e, "{} line {} differs from the uninterrupted local run", run.display(), i + 1);
        }
        let last = &expected[expected.len() - 1];
        eprintln!(
            "{}: {} metrics lines equal to the uninterrupted run's (last: env_steps {}, return_mean {})",
            run.file_name().unwrap().to_string_lossy(),
            expected.len(),
            last["env_steps"],
            last["return_mean"]
        );
    }
    drop(cluster);
    eprintln!(
        "install check {install_s:.1} s; Slurm part {slurm_s:.1} s; total {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
