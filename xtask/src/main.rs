//! `cargo xtask`: developer automation. Sets up MuJoCo, runs the tests, and
//! drives training runs and ablations through the `ddppo` binary. It holds no
//! product logic.

mod cuda;
mod gpu_check;
mod mujoco;
mod slurm;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "DDPPO developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Fetch MuJoCo 3.17.0 and the model XMLs into .cache/ (no-op when present).
    Setup {
        /// Also install the CUDA 13.0 toolkit (or check DDPPO_CUDA_HOME's) and
        /// the link-time stand-ins for the `cuda` build.
        #[arg(long)]
        cuda: bool,
    },
    /// Build the `ddppo` binary in release mode; prints its path.
    Build {
        /// With the `cuda` feature (real kernel compile; ~15-25 min on 2 cores
        /// the first time), into <target>/cuda.
        #[arg(long)]
        cuda: bool,
    },
    /// Set up, check formatting (`cargo fmt --check`) and lints (`cargo
    /// clippy -D warnings`), then run the whole test suite and `cargo check`
    /// the workspace with `--features cuda` (what CI runs).
    Test {
        /// Instead, on a machine with a GPU: build with the CUDA toolkit of
        /// `setup --cuda` (into <target>/cuda, as `build --cuda`) and run the
        /// CUDA tests (CPU/CUDA agreement, a short InvertedPendulum run on the
        /// GPU, a checkpoint moved between the devices).
        #[arg(long)]
        cuda: bool,
        /// Extra arguments passed to `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build in release mode, and train on one task with its preset
    /// (`ddppo train --env NAME`); prints where the run goes.
    Train {
        /// Task name with a preset (see `ddppo env list`).
        env: String,
        #[arg(long, default_value = "ddppo")]
        variant: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Run directory (default runs/<env>-<variant>-s<seed>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Build with the `cuda` feature and train with `--device cuda`.
        #[arg(long)]
        cuda: bool,
        /// Extra arguments passed to `ddppo train` (e.g. --set key=value).
        #[arg(last = true)]
        extra: Vec<String>,
    },
    /// Compare `ddppo` with a variant (or every variant: `all`) over seeds,
    /// then write the comparison plot and a table; or write and submit a
    /// Slurm job array for the same runs (`--slurm`).
    Ablate {
        /// A variant (see `ddppo variant list`) or `all`.
        variant: String,
        #[arg(long, default_value = "hopper")]
        env: String,
        #[arg(long, default_value_t = 5)]
        seeds: u64,
        /// Training processes at a time (local runs).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Env steps per run (default: the preset's).
        #[arg(long, conflicts_with = "config")]
        steps: Option<u64>,
        /// Where the runs, plot and table go (default runs/ablate-<variant>-<env>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// A config file every run starts from instead of the env's preset (`ddppo train --config`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override one config key in every run (`ddppo train --set`); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Write a Slurm job array (`sweep.sbatch` in the sweep directory) and
        /// submit it with sbatch, instead of running locally.
        #[arg(long, conflicts_with = "collect")]
        slurm: bool,
        /// Slurm partition.
        #[arg(long, requires = "slurm")]
        partition: Option<String>,
        /// Slurm time limit per task, HH:MM:SS; a task is told to checkpoint
        /// 120 s before it and requeues itself.
        #[arg(long, requires = "slurm", value_name = "HH:MM:SS")]
        time: Option<String>,
        /// GPUs per task (the runs use `--device cuda`; the binary is built with `--features cuda`).
        #[arg(long, requires = "slurm")]
        gpus: Option<u32>,
        /// CPUs per task; also the run's RAYON_NUM_THREADS (default 1).
        #[arg(long, requires = "slurm")]
        cpus: Option<u32>,
        /// Only draw the comparison plot and table, from the runs that exist
        /// (finished or not).
        #[arg(long)]
        collect: bool,
        /// Use this ddppo binary instead of building target/release/ddppo.
        #[arg(long, value_name = "PATH")]
        ddppo: Option<PathBuf>,
    },
    /// Make the GPU-check bundle (at most 64 MiB): the `ddppo` binary built with `--features cuda`,
    /// compressed, MuJoCo's library and XMLs, the CPU figures of `ddppo profile` and `run.sh`, which on
    /// a GPU machine runs `ddppo device-check` and profiles Hopper and Ant there.
    GpuCheck {
        /// The directory to write (absent or empty).
        #[arg(long, value_name = "DIR")]
        bundle: PathBuf,
        /// Use this `ddppo` binary instead of building the CUDA one (~40 min on 2 busy cores).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// Directory holding hopper.json and ant.json of `ddppo profile --json` measured on this
        /// machine's CPU (default .cache/gpu-check/cpu; the error names the commands).
        #[arg(long, value_name = "DIR")]
        cpu_figures: Option<PathBuf>,
        /// Size limit of the bundle (tests use a smaller one).
        #[arg(long, value_name = "MIB", default_value_t = gpu_check::LIMIT_MIB, hide = true)]
        limit_mib: u64,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.cmd {
        Task::Setup { cuda } => {
            let paths = mujoco::ensure(&root)?;
            println!("MuJoCo {} in {}", mujoco::MUJOCO_VERSION, paths.lib_dir.display());
            println!("model XMLs in {}", paths.assets_dir.display());
            if cuda {
                let tk = cuda::ensure(&root)?;
                println!("CUDA toolkit {}.{} in {}", tk.version.0, tk.version.1, tk.home.display());
                println!("runtime libraries (rpath of the cuda build) in {}", tk.lib_dir.display());
                match &tk.stubs {
                    Some(dir) => println!("link-time stand-in libcuda.so (driver calls fail) in {}", dir.display()),
                    None => println!("the toolkit's own link-time libcuda.so is used"),
                }
                match cuda::default_compute_cap() {
                    Some(cap) => println!(
                        "no GPU detected: kernels are compiled for compute capability {cap} (set CUDA_COMPUTE_CAP to change)"
                    ),
                    None => println!("kernels are compiled for CUDA_COMPUTE_CAP or the GPU nvidia-smi reports"),
                }
            }
        }
        Task::GpuCheck { bundle, binary, cpu_figures, limit_mib } => {
            let paths = mujoco::ensure(&root)?;
            let cpu_figures = cpu_figures.unwrap_or_else(|| root.join(".cache").join("gpu-check").join("cpu"));
            let binary = match binary {
                Some(b) => b,
                None => build_cli(&root, true)?,
            };
            let inputs = gpu_check::Inputs {
                binary,
                cpu_figures,
                mujoco_lib: paths.lib_dir.clone(),
                assets: paths.assets_dir.clone(),
                limit_mib,
            };
            let bytes = gpu_check::make(&bundle, &inputs)?;
            println!(
                "GPU-check bundle in {} ({:.1} MiB): copy it to the GPU machine and run `sh run.sh` there",
                bundle.display(),
                bytes as f64 / 1048576.0
            );
        }
        Task::Build { cuda } => {
            let ddppo = build_cli(&root, cuda)?;
            println!("{}", ddppo.display());
        }
        Task::Test { cuda: true, args } => {
            let paths = mujoco::ensure(&root)?;
            let tk = cuda::ensure(&root)?;
            let mut cmd = cargo(&root, &paths);
            cmd.args(cuda_test_args()).arg(target_dir(&root).join("cuda")).args(&args);
            tk.apply(&mut cmd);
            tk.apply_runtime(&mut cmd);
            // One test at a time (they share the GPU), their lines shown.
            cmd.args(["--", "--nocapture", "--test-threads=1"]);
            status(cmd, "cargo test --features cuda")?;
        }
        Task::Test { cuda: false, args } => {
            let paths = mujoco::ensure(&root)?;
            // Formatting and lints first: quick, and a failure is one line
            // before the long test run.
            let mut cmd = cargo(&root, &paths);
            cmd.args(["fmt", "--all", "--check"]);
            status(cmd, "cargo fmt --all --check")?;
            let mut cmd = cargo(&root, &paths);
            cmd.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
            status(cmd, "cargo clippy --workspace --all-targets -- -D warnings")?;
            let mut cmd = cargo(&root, &paths);
            cmd.args(["test", "--workspace"]).args(&args);
            status(cmd, "cargo test")?;
            // The CUDA code compiles on every CI run; the stand-in nvcc keeps
            // this to a check, in its own target dir so that its empty PTX never
            // reaches a real build.
            let mut cmd = cargo(&root, &paths);
            cmd.args(["check", "--workspace", "--all-targets", "--features", "cuda", "--target-dir"])
                .arg(target_dir(&root).join("cuda-check"));
            cuda::check_env(&root, &mut cmd)?;
            status(cmd, "cargo check --features cuda")?;
        }
        Task::Train { env, variant, seed, out, cuda, extra } => {
            let ddppo = build_cli(&root, cuda)?;
            let out = out.unwrap_or_else(|| root.join("runs").join(format!("{env}-{variant}-s{seed}")));
            // `ddppo train --out` continues the run a directory already holds
            // (the same command again after an interruption).
            println!("training {env} ({variant}, seed {seed}); the run goes to {}", out.display());
            let mut cmd = Command::new(&ddppo);
            cmd.args(["train", "--env", &env, "--variant", &variant, "--seed", &seed.to_string(), "--out"])
                .arg(&out)
                .args(&extra);
            if cuda {
                cmd.args(["--device", "cuda"]);
            }
            status(cmd, "ddppo train")?;
            println!("run finished: {}", out.display());
        }
        Task::Ablate {
            variant,
            env,
            seeds,
            jobs,
            steps,
            out,
            config,
            sets,
            slurm,
            partition,
            time,
            gpus,
            cpus,
            collect,
            ddppo,
        } => {
            if jobs == 0 || seeds == 0 {
                bail!("--jobs and --seeds must be at least 1");
            }
            if cpus == Some(0) {
                bail!("--cpus must be at least 1");
            }
            if let Some(t) = &time {
                slurm::parse_time(t)?;
            }
            let cuda = gpus.is_some_and(|g| g > 0);
            let ddppo = match ddppo {
                Some(p) => std::path::absolute(&p).with_context(|| format!("--ddppo {}", p.display()))?,
                None => build_cli(&root, cuda)?,
            };
            if !ddppo.is_file() {
                bail!("no ddppo binary at {}", ddppo.display());
            }
            let variants = compared_variants(&ddppo, &variant)?;
            let out =
                std::path::absolute(out.unwrap_or_else(|| root.join("runs").join(format!("ablate-{variant}-{env}"))))?;
            let mut runs = Vec::new();
            for v in std::iter::once("ddppo").chain(variants.iter().map(String::as_str)) {
                for seed in 0..seeds {
                    runs.push(slurm::Task {
                        variant: v.to_string(),
                        seed,
                        dir: out.join(format!("{env}-{v}-s{seed}")),
                    });
                }
            }
            if collect {
                return draw_comparison(&ddppo, &out, &runs, true);
            }
            // Arguments every run shares, between `--seed` and `--out`.
            let mut train_args = Vec::new();
            if let Some(c) = &config {
                let c = std::path::absolute(c)?;
                if !c.is_file() {
                    bail!("--config {}: no such file", c.display());
                }
                train_args.push("--config".to_string());
                train_args.push(c.to_str().context("--config: the path is not valid UTF-8")?.to_string());
            }
            if let Some(n) = steps {
                train_args.push("--set".into());
                train_args.push(format!("epochs={}", epochs_for(&ddppo, &env, &sets, n)?));
            }
            for kv in &sets {
                train_args.push("--set".into());
                train_args.push(kv.clone());
            }
            if cuda {
                train_args.extend(["--device".to_string(), "cuda".to_string()]);
            }
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            if slurm {
                let sweep = slurm::Sweep {
                    name: format!("ablate-{variant}-{env}"),
                    dir: &out,
                    ddppo: &ddppo,
                    env: &env,
                    tasks: &runs,
                    train_args: &train_args,
                    partition: partition.as_deref(),
                    time: time.as_deref(),
                    gpus,
                    cpus: cpus.unwrap_or(1),
                };
                let path = out.join("sweep.sbatch");
                std::fs::write(&path, slurm::script(&sweep)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!("wrote {} ({} array tasks, one per run)", path.display(), runs.len());
                let collect_cmd = format!(
                    "cargo xtask ablate {variant} --env {env} --seeds {seeds} --out {} --collect",
                    out.display()
                );
                match slurm::submit(&path)? {
                    slurm::Submitted::Job(id) => {
                        println!("submitted job array {id}");
                        println!("watch: squeue -j {id}; logs: {}/task-N.out and .err", out.display());
                        println!("collect (at any time): {collect_cmd}");
                    }
                    slurm::Submitted::NoSbatch => {
                        println!("sbatch is not installed here; on the cluster, submit with:");
                        println!("  sbatch {}", path.display());
                        println!("then collect (at any time): {collect_cmd}");
                    }
                }
                return Ok(());
            }
            println!("ablation: {} runs, {jobs} at a time, into {}", runs.len(), out.display());
            run_parallel(&ddppo, &env, &train_args, &runs, jobs)?;
            draw_comparison(&ddppo, &out, &runs, false)?;
        }
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").context("run this through `cargo xtask`")?;
    Ok(Path::new(&dir).parent().context("xtask has no parent directory")?.to_path_buf())
}

/// A `cargo` command that builds against the MuJoCo in `paths`.
fn cargo(root: &Path, paths: &mujoco::MujocoPaths) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root).env("MUJOCO_DYNAMIC_LINK_DIR", &paths.lib_dir).env("DDPPO_ASSETS_DIR", &paths.assets_dir);
    cmd
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

/// Sets up MuJoCo (and CUDA) and builds the `ddppo` binary in release mode
/// (with CUDA when asked); returns its path. The CUDA build has its own target
/// dir, so the CPU and CUDA binaries do not replace each other. Cargo's own
/// progress shows on a terminal; elsewhere (a log file, CI) one line says why
/// nothing happens for minutes.
fn build_cli(root: &Path, cuda: bool) -> Result<PathBuf> {
    let paths = mujoco::ensure(root)?;
    let on_terminal = std::io::stderr().is_terminal();
    if !on_terminal {
        eprintln!("building the release binary (a few minutes the first time)...");
    }
    let mut cmd = cargo(root, &paths);
    cmd.args(release_build_args(on_terminal, cuda));
    let mut target = target_dir(root);
    if cuda {
        let tk = cuda::ensure(root)?;
        tk.apply(&mut cmd);
        target = target.join("cuda");
        cmd.arg("--target-dir").arg(&target);
        eprintln!(
            "building ddppo with CUDA {}.{} (the kernel compile takes 15-25 minutes on 2 cores the first time)",
            tk.version.0, tk.version.1
        );
    }
    status(cmd, "cargo build --release")?;
    Ok(target.join("release").join("ddppo"))
}

/// `cargo test` of the CUDA tests, up to the target dir (shared with `build --cuda`).
fn cuda_test_args() -> Vec<&'static str> {
    vec!["test", "--release", "-p", "ddppo-agent", "--features", "cuda", "--test", "cuda_agreement", "--target-dir"]
}

/// Off a terminal cargo would print a line per crate; errors show either way.
fn release_build_args(on_terminal: bool, cuda: bool) -> Vec<&'static str> {
    let mut args = vec!["build", "--release", "-p", "ddppo-cli"];
    if !on_terminal {
        args.push("--quiet");
    }
    if cuda {
        args.extend(["--features", "cuda"]);
    }
    args
}

/// The variants compared with `ddppo`: the one named, or every other one for
/// `all`; the binary lists what exists (`ddppo variant list`).
fn compared_variants(ddppo: &Path, name: &str) -> Result<Vec<String>> {
    let out = Command::new(ddppo).args(["variant", "list"]).output().context("cannot run ddppo variant list")?;
    if !out.status.success() {
        bail!("ddppo variant list failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let others: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "ddppo")
        .map(String::from)
        .collect();
    match name {
        "all" => Ok(others),
        "ddppo" => bail!("an ablation compares ddppo with another variant; valid: {}, all", others.join(", ")),
        v if others.iter().any(|o| o == v) => Ok(vec![v.to_string()]),
        v => bail!("unknown variant '{v}'; valid: {}, all", others.join(", ")),
    }
}

/// `comparison.svg` and `table.md` in `out` from the runs' metrics. With
/// `partial`, runs without an evaluation yet are left out rather than an error.
fn draw_comparison(ddppo: &Path, out: &Path, runs: &[slurm::Task], partial: bool) -> Result<()> {
    let dirs: Vec<&PathBuf> = runs
        .iter()
        .map(|r| &r.dir)
        .filter(|d| !partial || std::fs::read_to_string(d.join("metrics.jsonl")).is_ok_and(|t| !t.trim().is_empty()))
        .collect();
    if dirs.is_empty() {
        bail!("none of the {} runs in {} has an evaluation yet", runs.len(), out.display());
    }
    if partial {
        println!("{} of {} runs have evaluations", dirs.len(), runs.len());
    }
    let plot = out.join("comparison.svg");
    let mut cmd = Command::new(ddppo);
    cmd.arg("plot").args(&dirs).arg("--out").arg(&plot);
    status(cmd, "ddppo plot")?;
    let mut cmd = Command::new(ddppo);
    cmd.arg("table").args(&dirs);
    let table = cmd.output().context("cannot run ddppo table")?;
    if !table.status.success() {
        bail!("ddppo table failed: {}", String::from_utf8_lossy(&table.stderr).trim());
    }
    std::fs::write(out.join("table.md"), &table.stdout)?;
    print!("{}", String::from_utf8_lossy(&table.stdout));
    println!("plot: {}\ntable: {}", plot.display(), out.join("table.md").display());
    Ok(())
}

/// `--steps N` as whole epochs of the runs' `epoch_length` (rounded up): the
/// rollout-length schedule counts epochs, so the epoch length stays. The
/// binary resolves the runs' config (`ddppo config`: the preset and `--set`s).
fn epochs_for(ddppo: &Path, env: &str, sets: &[String], steps: u64) -> Result<u64> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let mut cmd = Command::new(ddppo);
    cmd.args(["config", "--env", env]);
    for kv in sets {
        cmd.args(["--set", kv]);
    }
    let out = cmd.output().context("cannot run ddppo config")?;
    if !out.status.success() {
        bail!("ddppo config failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let config: toml::Table =
        toml::from_str(&String::from_utf8_lossy(&out.stdout)).context("ddppo config printed no TOML")?;
    let epoch_length = config
        .get("epoch_length")
        .and_then(toml::Value::as_integer)
        .and_then(|n| u64::try_from(n).ok())
        .filter(|&n| n > 0)
        .context("ddppo config printed no epoch_length")?;
    Ok(steps.div_ceil(epoch_length).max(1))
}

/// Runs one `ddppo train` per entry of `runs`, `jobs` at a time; a run that
/// was stopped continues from its newest checkpoint (or from step 0), a
/// finished one is left as it is.
fn run_parallel(ddppo: &Path, env: &str, train_args: &[String], runs: &[slurm::Task], jobs: usize) -> Result<()> {
    let mut pending = runs.iter();
    let mut running: Vec<(std::process::Child, &PathBuf)> = Vec::new();
    let mut failed = Vec::new();
    loop {
        while running.len() < jobs {
            let Some(slurm::Task { variant, seed, dir }) = pending.next() else {
                break;
            };
            // The one rule for a run directory (in `ddppo train`): a run that
            // was stopped continues, a finished one is left as it is.
            let mut cmd = Command::new(ddppo);
            cmd.args(["train", "--env", env, "--variant", variant, "--seed", &seed.to_string()])
                .args(train_args)
                .arg("--out")
                .arg(dir);
            std::fs::create_dir_all(dir)?;
            // Appended to: a continued run keeps the log of its earlier part.
            let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.with_extension("log"))?;
            cmd.stdout(log.try_clone()?).stderr(log);
            println!("started {}", dir.display());
            running.push((cmd.spawn().context("cannot start ddppo train")?, dir));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let mut i = 0;
        while i < running.len() {
            if let Some(st) = running[i].0.try_wait()? {
                let (_, dir) = running.swap_remove(i);
                if st.success() {
                    println!("finished {}", dir.display());
                } else {
                    println!("FAILED {} (see {})", dir.display(), dir.with_extension("log").display());
                    failed.push(dir.display().to_string());
                }
            } else {
                i += 1;
            }
        }
    }
    if !failed.is_empty() {
        bail!("{} run(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

fn status(mut cmd: Command, what: &str) -> Result<()> {
    let st = cmd.status().with_context(|| format!("cannot start {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_build_shows_cargo_progress_on_a_terminal_only() {
        assert!(!release_build_args(true, false).contains(&"--quiet"));
        assert!(release_build_args(false, false).contains(&"--quiet"));
        assert!(release_build_args(true, true).ends_with(&["--features", "cuda"]));
        let t = cuda_test_args();
        assert!(t.windows(2).any(|w| w == ["--features", "cuda"]) && t.contains(&"cuda_agreement"));
        assert_eq!(t.last(), Some(&"--target-dir"));
    }
}
