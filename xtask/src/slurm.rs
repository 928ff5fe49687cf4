//! `cargo xtask ablate ... --slurm`: one Slurm job array per sweep.
//!
//! Each array task is one run: its `SLURM_ARRAY_TASK_ID` selects a (variant,
//! seed) and the task calls the same `ddppo train` command line every time it
//! starts, which continues the run from its newest checkpoint when the
//! directory already holds it (exit code 75 means "interrupted after a
//! complete checkpoint, resumable").
//!
//! Which signal reaches `ddppo`: `--signal=USR1@T` without `B:` signals job
//! *steps* (processes started by `srun`) only, not a program the batch script
//! runs directly, so the script asks for `B:` (the batch shell), traps the
//! signal and forwards it to `ddppo`. A SIGTERM (time limit, preemption,
//! `scontrol requeue`, `scancel`) reaches every process of the job; the trap
//! forwards it too, which `ddppo` tolerates (a second signal while it writes
//! its checkpoint changes nothing). The script requeues its own task only
//! after the time-limit warning (USR1): `--requeue` alone does not requeue a
//! job that hits its time limit, while a SIGTERM came from Slurm itself
//! (which requeues preempted and `scontrol requeue`d jobs by itself) or from
//! `scancel`, which must stay cancelled.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Seconds before the time limit at which the batch shell gets SIGUSR1.
/// `ddppo train` needs up to 20 s for its checkpoint; Slurm's event loop may
/// send the signal up to 60 s earlier than asked, and the rest is margin for
/// a slow shared file system.
pub const SIGNAL_LEAD_S: u64 = 120;

/// The exit code of `ddppo train` for "interrupted by a signal after a
/// complete checkpoint was written; the same command continues the run".
pub const EXIT_RESUMABLE: i32 = 75;

/// One array task.
pub struct Task {
    pub variant: String,
    pub seed: u64,
    pub dir: PathBuf,
}

/// Everything the job script needs; paths absolute.
pub struct Sweep<'a> {
    pub name: String,
    pub dir: &'a Path,
    pub ddppo: &'a Path,
    pub env: &'a str,
    pub tasks: &'a [Task],
    /// `ddppo train` arguments shared by every run (config, overrides,
    /// device), between `--seed` and `--out`.
    pub train_args: &'a [String],
    pub partition: Option<&'a str>,
    pub time: Option<&'a str>,
    pub gpus: Option<u32>,
    pub cpus: u32,
}

/// `HH:MM:SS` in seconds; refuses a limit that leaves no time to train
/// before the checkpoint warning.
pub fn parse_time(text: &str) -> Result<u64> {
    let bad = || anyhow::anyhow!("--time {text}: expected HH:MM:SS (e.g. 04:00:00)");
    let parts: Vec<&str> = text.split(':').collect();
    let [h, m, s] = parts[..] else { return Err(bad()) };
    let num = |p: &str| -> Result<u64> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        p.parse::<u64>().map_err(|_| bad())
    };
    let (h, m, s) = (num(h)?, num(m)?, num(s)?);
    if m >= 60 || s >= 60 {
        return Err(bad());
    }
    let secs = h.checked_mul(3600).and_then(|x| x.checked_add(m * 60 + s)).ok_or_else(bad)?;
    // Slurm may send the warning up to 60 s before the requested lead.
    let earliest = SIGNAL_LEAD_S + 60;
    if secs <= earliest {
        bail!(
            "--time {text} leaves no time to train: each task is told to checkpoint {SIGNAL_LEAD_S} s (up to {earliest} s) \
             before its limit; give more than {earliest} s"
        );
    }
    Ok(secs)
}

/// A word for bash: single-quoted unless it is plainly safe.
fn quote(word: &str) -> String {
    let plain = !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain { word.to_string() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str().with_context(|| format!("{} is not valid UTF-8; Slurm scripts need text paths", path.display()))
}

/// The job script (`sweep.sbatch`).
pub fn script(sweep: &Sweep) -> Result<String> {
    let dir = utf8(sweep.dir)?;
    // #SBATCH lines are split at whitespace, so their paths cannot be quoted.
    if dir.chars().any(char::is_whitespace) {
        bail!("the sweep directory {dir} holds whitespace, which #SBATCH lines cannot carry; choose another --out");
    }
    if sweep.tasks.is_empty() {
        bail!("the sweep has no runs");
    }
    let mut s = String::new();
    let line = |s: &mut String, l: &str| {
        s.push_str(l);
        s.push('\n');
    };
    line(&mut s, "#!/bin/bash");
    line(&mut s, "# Written by `cargo xtask ablate --slurm`; regenerate it rather than editing.");
    line(&mut s, &format!("#SBATCH --job-name={}", sweep.name));
    line(&mut s, &format!("#SBATCH --array=0-{}", sweep.tasks.len() - 1));
    line(&mut s, "#SBATCH --ntasks=1");
    line(&mut s, &format!("#SBATCH --cpus-per-task={}", sweep.cpus));
    if let Some(p) = sweep.partition {
        line(&mut s, &format!("#SBATCH --partition={p}"));
    }
    if let Some(t) = sweep.time {
        line(&mut s, &format!("#SBATCH --time={t}"));
    }
    if let Some(g) = sweep.gpus {
        line(&mut s, &format!("#SBATCH --gpus={g}"));
    }
    line(&mut s, &format!("#SBATCH --chdir={dir}"));
    // Per task; appended to across restarts (the array job id stays).
    line(&mut s, &format!("#SBATCH --output={dir}/task-%a.out"));
    line(&mut s, &format!("#SBATCH --error={dir}/task-%a.err"));
    line(&mut s, "#SBATCH --open-mode=append");
    line(&mut s, "#SBATCH --requeue");
    line(&mut s, &format!("#SBATCH --signal=B:USR1@{SIGNAL_LEAD_S}"));
    line(&mut s, "");
    line(&mut s, &format!("DDPPO={}", quote(utf8(sweep.ddppo)?)));
    line(&mut s, &format!("export RAYON_NUM_THREADS={}", sweep.cpus));
    line(&mut s, "case \"${SLURM_ARRAY_TASK_ID:-}\" in");
    for (i, t) in sweep.tasks.iter().enumerate() {
        line(&mut s, &format!("  {i}) VARIANT={} SEED={} RUN={} ;;", quote(&t.variant), t.seed, quote(utf8(&t.dir)?)));
    }
    line(&mut s, "  *) echo \"error: this sweep has no run for array task '${SLURM_ARRAY_TASK_ID:-}'\" >&2; exit 1 ;;");
    line(&mut s, "esac");
    line(&mut s, "TASK=\"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}\"");
    line(
        &mut s,
        "echo \"task $TASK: $RUN, start $((${SLURM_RESTART_COUNT:-0} + 1)) on $(hostname) at $(date -u +%FT%TZ)\"",
    );
    line(&mut s, "");
    line(&mut s, "# Slurm signals this shell; ddppo runs in the background so that the traps run at once.");
    line(&mut s, "warned=0 signalled=0 pid=");
    line(&mut s, "trap 'warned=1 signalled=1; [ -n \"$pid\" ] && kill -USR1 \"$pid\" 2>/dev/null' USR1");
    line(&mut s, "trap 'signalled=1; [ -n \"$pid\" ] && kill -TERM \"$pid\" 2>/dev/null' TERM INT");
    let mut cmd = vec![
        "\"$DDPPO\"".to_string(),
        "train".into(),
        "--env".into(),
        quote(sweep.env),
        "--variant".into(),
        "\"$VARIANT\"".into(),
        "--seed".into(),
        "\"$SEED\"".into(),
    ];
    cmd.extend(sweep.train_args.iter().map(|a| quote(a)));
    cmd.extend(["--out".into(), "\"$RUN\"".into(), "&".into()]);
    line(&mut s, &cmd.join(" "));
    line(&mut s, "pid=$!");
    line(&mut s, "wait \"$pid\"; rc=$?");
    line(&mut s, "# A trapped signal ends `wait` early (status > 128): wait on until ddppo exits.");
    line(&mut s, "while [ \"$rc\" -gt 128 ] && [ \"$signalled\" = 1 ]; do signalled=0; wait \"$pid\"; rc=$?; done");
    line(&mut s, "echo \"task $TASK: ddppo train exited $rc at $(date -u +%FT%TZ)\"");
    line(&mut s, &format!("if [ \"$rc\" = {EXIT_RESUMABLE} ] && [ \"$warned\" = 1 ]; then"));
    line(&mut s, "  # The time-limit warning: a job that reaches its limit is not requeued by Slurm.");
    line(&mut s, "  echo \"task $TASK: checkpointed before the time limit; requeueing it\"");
    line(&mut s, "  scontrol requeue \"$TASK\"");
    line(&mut s, &format!("elif [ \"$rc\" = {EXIT_RESUMABLE} ]; then"));
    line(
        &mut s,
        "  echo \"task $TASK: checkpointed after SIGTERM (preemption, scontrol requeue or scancel); \
         a requeued task continues the run\"",
    );
    line(&mut s, "fi");
    line(&mut s, "exit \"$rc\"");
    Ok(s)
}

/// What `sbatch` did with the script.
pub enum Submitted {
    /// The array's job id.
    Job(String),
    /// No `sbatch` on this machine.
    NoSbatch,
}

/// Submits `script` with `sbatch --parsable`.
pub fn submit(script: &Path) -> Result<Submitted> {
    let out = match Command::new("sbatch").arg("--parsable").arg(script).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Submitted::NoSbatch),
        Err(e) => return Err(e).context("cannot run sbatch"),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("sbatch {} failed ({}): {}", script.display(), out.status, err.trim().replace('\n', " "));
    }
    // `--parsable` prints `jobid` or `jobid;cluster`.
    let text = String::from_utf8_lossy(&out.stdout);
    let id = text.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        bail!("sbatch printed no job id: {}", text.trim());
    }
    Ok(Submitted::Job(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks() -> Vec<Task> {
        vec![
            Task { variant: "ddppo".into(), seed: 0, dir: "/c/sw/pendulum-ddppo-s0".into() },
            Task { variant: "sac".into(), seed: 0, dir: "/c/sw/pendulum-sac-s0".into() },
            Task { variant: "ddppo".into(), seed: 1, dir: "/c/sw/pendulum-ddppo-s1".into() },
        ]
    }

    fn sweep<'a>(tasks: &'a [Task], args: &'a [String]) -> Sweep<'a> {
        Sweep {
            name: "ablate-sac-pendulum".into(),
            dir: Path::new("/c/sw"),
            ddppo: Path::new("/repo/target/release/ddppo"),
            env: "pendulum",
            tasks,
            train_args: args,
            partition: Some("gpu"),
            time: Some("04:00:00"),
            gpus: None,
            cpus: 4,
        }
    }

    #[test]
    fn time_limits() {
        assert_eq!(parse_time("04:00:00").unwrap(), 14_400);
        assert_eq!(parse_time("100:00:01").unwrap(), 360_001);
        for bad in ["4h", "04:00", "04:60:00", "00:00:61", "-1:00:00", "a:b:c", ""] {
            assert!(parse_time(bad).unwrap_err().to_string().contains("HH:MM:SS"), "{bad}");
        }
        assert!(parse_time("00:03:00").unwrap_err().to_string().contains("leaves no time"));
        assert_eq!(parse_time("00:03:01").unwrap(), 181);
    }

    #[test]
    fn quoting_survives_bash() {
        for word in ["plain", "with space", "it's", "$HOME", "a\"b", "x=`id`"] {
            let out = Command::new("bash").arg("-c").arg(format!("printf %s {}", quote(word))).output().unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), word);
        }
    }

    #[test]
    fn script_maps_each_array_task_to_its_run() {
        let tasks = tasks();
        let args = vec!["--set".to_string(), "epochs=3".to_string(), "--config".into(), "/c/my conf.toml".into()];
        let text = script(&sweep(&tasks, &args)).unwrap();
        for l in [
            "#SBATCH --array=0-2",
            "#SBATCH --cpus-per-task=4",
            "#SBATCH --partition=gpu",
            "#SBATCH --time=04:00:00",
            "#SBATCH --output=/c/sw/task-%a.out",
            "#SBATCH --signal=B:USR1@120",
            "export RAYON_NUM_THREADS=4",
        ] {
            assert!(text.lines().any(|x| x == l), "no line `{l}` in\n{text}");
        }
        assert!(!text.contains("--gpus"));
        // Run the mapping part with bash for each task id and read back what
        // the task would train.
        let head: String = text.split("# Slurm signals").next().unwrap().to_string();
        for (i, t) in tasks.iter().enumerate() {
            let probe = format!("{head}\necho \"$VARIANT|$SEED|$RUN|$RAYON_NUM_THREADS\"");
            let out = Command::new("bash")
                .arg("-c")
                .arg(&probe)
                .env("SLURM_ARRAY_TASK_ID", i.to_string())
                .env("SLURM_ARRAY_JOB_ID", "7")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let last = stdout.lines().last().unwrap();
            assert_eq!(last, format!("{}|{}|{}|4", t.variant, t.seed, t.dir.display()));
        }
        let out = Command::new("bash").arg("-c").arg(&head).env("SLURM_ARRAY_TASK_ID", "3").output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no run for array task '3'"));
        let syntax = Command::new("bash").arg("-n").arg("-c").arg(&text).status().unwrap();
        assert!(syntax.success());
        assert!(text.contains("--set epochs=3 --config '/c/my conf.toml' --out \"$RUN\" &"), "{text}");
    }

    /// The script's signal handling with a stand-in `ddppo` (exits 75 on
    /// USR1/TERM, as the real one does after its checkpoint) and a stand-in
    /// `scontrol` that records its arguments; the real Slurm test is
    /// xtask/tests/slurm.rs.
    fn run_script_signalled(sig: &str) -> (Option<i32>, String, String) {
        let dir = std::env::temp_dir().join(format!("xtask-slurm-unit-{sig}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let fake = dir.join("bin/ddppo");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/bash\ntrap 'echo USR1 >> {d}/got; exit 75' USR1\ntrap 'echo TERM >> {d}/got; exit 75' TERM\n\
                 echo \"$@\" > {d}/args\nfor i in $(seq 100); do sleep 0.1; done\n",
                d = dir.display()
            ),
        )
        .unwrap();
        std::fs::write(dir.join("bin/scontrol"), format!("#!/bin/bash\necho \"$@\" >> {}/scontrol\n", dir.display()))
            .unwrap();
        for f in ["bin/ddppo", "bin/scontrol"] {
            Command::new("chmod").arg("+x").arg(dir.join(f)).status().unwrap();
        }
        let tasks = tasks();
        let mut sw = sweep(&tasks, &[]);
        sw.ddppo = &fake;
        std::fs::write(dir.join("job.sh"), script(&sw).unwrap()).unwrap();
        let path = format!("{}:{}", dir.join("bin").display(), std::env::var("PATH").unwrap_or_default());
        let mut child = Command::new("bash")
            .arg(dir.join("job.sh"))
            .env("PATH", path)
            .env("SLURM_ARRAY_TASK_ID", "1")
            .env("SLURM_ARRAY_JOB_ID", "7")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        while !dir.join("args").exists() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().unwrap();
        let code = child.wait().unwrap().code();
        let mut out = String::new();
        std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
        let got = std::fs::read_to_string(dir.join("got")).unwrap_or_default();
        let requeued = std::fs::read_to_string(dir.join("scontrol")).unwrap_or_default();
        assert!(
            std::fs::read_to_string(dir.join("args"))
                .unwrap()
                .starts_with("train --env pendulum --variant sac --seed 0 --out")
        );
        let _ = std::fs::remove_dir_all(&dir);
        (code, got + &out, requeued)
    }

    #[test]
    fn time_limit_warning_is_forwarded_and_requeues_the_task() {
        let (code, log, requeued) = run_script_signalled("USR1");
        assert_eq!(code, Some(75));
        assert!(log.starts_with("USR1\n") && log.contains("ddppo train exited 75"), "{log}");
        assert_eq!(requeued, "requeue 7_1\n");
    }

    #[test]
    fn sigterm_is_forwarded_without_a_requeue() {
        let (code, log, requeued) = run_script_signalled("TERM");
        assert_eq!(code, Some(75));
        assert!(log.starts_with("TERM\n") && log.contains("ddppo train exited 75"), "{log}");
        assert_eq!(requeued, "", "a SIGTERM run (scancel) must not requeue itself");
    }

    #[test]
    fn gpus_and_whitespace() {
        let tasks = tasks();
        let mut s = sweep(&tasks, &[]);
        s.gpus = Some(2);
        s.partition = None;
        let text = script(&s).unwrap();
        assert!(text.lines().any(|l| l == "#SBATCH --gpus=2"));
        assert!(!text.contains("--partition"));
        let spaced = Path::new("/c/my sweep");
        s.dir = spaced;
        assert!(script(&s).unwrap_err().to_string().contains("whitespace"));
    }
}
