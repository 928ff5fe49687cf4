//! `cargo xtask`: developer automation. Sets up MuJoCo, runs the tests, and
//! drives training runs and ablations through the `ddppo` binary. It holds no
//! product logic.

mod cuda;
mod mujoco;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
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
    /// Set up, then run the whole test suite and `cargo check` the workspace
    /// with `--features cuda` (what CI runs).
    Test {
        /// Extra arguments passed to `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build in release mode, and train on one task with its preset
    /// (`ddppo train --env NAME`); prints where the run goes.
    Train {
        /// Task name (ant, hopper, walker2d, half-cheetah, humanoid, inverted-pendulum, pendulum).
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
    /// then write the comparison plot and a table.
    Ablate {
        /// no-grad-loss, single-model, double-params, mbpo, sac, or all.
        variant: String,
        #[arg(long, default_value = "hopper")]
        env: String,
        #[arg(long, default_value_t = 5)]
        seeds: u64,
        /// Training processes at a time.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Env steps per run (default: the preset's).
        #[arg(long)]
        steps: Option<u64>,
        /// Where the runs, plot and table go (default runs/ablate-<variant>-<env>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

const VARIANTS: &[&str] = &["no-grad-loss", "single-model", "double-params", "mbpo", "sac"];

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
                    Some(cap) => println!("no GPU detected: kernels are compiled for compute capability {cap} (set CUDA_COMPUTE_CAP to change)"),
                    None => println!("kernels are compiled for CUDA_COMPUTE_CAP or the GPU nvidia-smi reports"),
                }
            }
        }
        Task::Build { cuda } => {
            let ddppo = build_cli(&root, cuda)?;
            println!("{}", ddppo.display());
        }
        Task::Test { args } => {
            let paths = mujoco::ensure(&root)?;
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
            let mut cmd = Command::new(&ddppo);
            if has_checkpoint(&out) && extra.is_empty() {
                // The same command again continues an interrupted run.
                println!("continuing {env} ({variant}, seed {seed}) in {}", out.display());
                cmd.arg("train").arg("--resume").arg(&out);
            } else {
                println!("training {env} ({variant}, seed {seed}); the run goes to {}", out.display());
                cmd.args(["train", "--env", &env, "--variant", &variant, "--seed", &seed.to_string(), "--out"])
                    .arg(&out)
                    .args(&extra);
            }
            if cuda {
                cmd.args(["--device", "cuda"]);
            }
            status(cmd, "ddppo train")?;
            println!("run finished: {}", out.display());
        }
        Task::Ablate { variant, env, seeds, jobs, steps, out } => {
            let variants: Vec<&str> = match variant.as_str() {
                "all" => VARIANTS.to_vec(),
                v if VARIANTS.contains(&v) => vec![v],
                v => bail!("unknown variant '{v}'; valid: {}, all", VARIANTS.join(", ")),
            };
            if jobs == 0 || seeds == 0 {
                bail!("--jobs and --seeds must be at least 1");
            }
            let ddppo = build_cli(&root, false)?;
            let out = out.unwrap_or_else(|| root.join("runs").join(format!("ablate-{variant}-{env}")));
            let mut runs = Vec::new();
            for v in std::iter::once("ddppo").chain(variants.iter().copied()) {
                for seed in 0..seeds {
                    runs.push((v.to_string(), seed, out.join(format!("{env}-{v}-s{seed}"))));
                }
            }
            println!("ablation: {} runs, {jobs} at a time, into {}", runs.len(), out.display());
            let epochs = match steps {
                Some(n) => Some(epochs_for(&root, &env, n)?),
                None => None,
            };
            run_parallel(&ddppo, &env, epochs, &runs, jobs)?;
            let dirs: Vec<&PathBuf> = runs.iter().map(|r| &r.2).collect();
            let plot = out.join("comparison.svg");
            let mut cmd = Command::new(&ddppo);
            cmd.arg("plot").args(&dirs).arg("--out").arg(&plot);
            status(cmd, "ddppo plot")?;
            let mut cmd = Command::new(&ddppo);
            cmd.arg("table").args(&dirs);
            let table = cmd.output().context("cannot run ddppo table")?;
            if !table.status.success() {
                bail!("ddppo table failed: {}", String::from_utf8_lossy(&table.stderr).trim());
            }
            std::fs::write(out.join("table.md"), &table.stdout)?;
            print!("{}", String::from_utf8_lossy(&table.stdout));
            println!("plot: {}\ntable: {}", plot.display(), out.join("table.md").display());
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

/// Sets up MuJoCo (and CUDA) and builds the `ddppo` binary in release mode;
/// returns its path. The CUDA build has its own target dir, so the CPU and
/// CUDA binaries do not replace each other.
fn build_cli(root: &Path, with_cuda: bool) -> Result<PathBuf> {
    let paths = mujoco::ensure(root)?;
    let mut cmd = cargo(root, &paths);
    cmd.args(["build", "--release", "--quiet", "-p", "ddppo-cli"]);
    let mut target = target_dir(root);
    if with_cuda {
        let tk = cuda::ensure(root)?;
        tk.apply(&mut cmd);
        target = target.join("cuda");
        cmd.args(["--features", "cuda", "--target-dir"]).arg(&target);
        println!("building ddppo with CUDA {}.{} (the kernel compile takes minutes the first time)", tk.version.0, tk.version.1);
    }
    status(cmd, "cargo build --release")?;
    Ok(target.join("release").join("ddppo"))
}

/// `--steps N` as whole epochs of the preset's `epoch_length` (rounded up):
/// the rollout-length schedule counts epochs, so the epoch length stays.
fn epochs_for(root: &Path, env: &str, steps: u64) -> Result<u64> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let preset = root.join("configs").join(format!("{env}.toml"));
    let text = std::fs::read_to_string(&preset)
        .with_context(|| format!("unknown env '{env}': no preset {}", preset.display()))?;
    let epoch_length = text
        .lines()
        .find_map(|l| l.strip_prefix("epoch_length"))
        .and_then(|rest| rest.trim_start().strip_prefix('='))
        .and_then(|v| v.split('#').next())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .with_context(|| format!("{} has no epoch_length", preset.display()))?;
    Ok(steps.div_ceil(epoch_length).max(1))
}

/// Runs one `ddppo train` per entry of `runs`, `jobs` at a time; a run whose
/// directory already holds a checkpoint is resumed rather than restarted (a
/// finished one is left as it is), and one that was stopped before its first
/// checkpoint is moved aside to `<dir>.incomplete` and started again.
fn run_parallel(
    ddppo: &Path,
    env: &str,
    epochs: Option<u64>,
    runs: &[(String, u64, PathBuf)],
    jobs: usize,
) -> Result<()> {
    let mut pending = runs.iter();
    let mut running: Vec<(std::process::Child, &PathBuf)> = Vec::new();
    let mut failed = Vec::new();
    loop {
        while running.len() < jobs {
            let Some((variant, seed, dir)) = pending.next() else {
                break;
            };
            let mut cmd = Command::new(ddppo);
            if has_checkpoint(dir) {
                cmd.arg("train").arg("--resume").arg(dir);
            } else {
                if dir.join("config.toml").exists() {
                    let aside = dir.with_extension("incomplete");
                    let _ = std::fs::remove_dir_all(&aside);
                    std::fs::rename(dir, &aside)?;
                    println!("{} stopped before its first checkpoint; moved to {}", dir.display(), aside.display());
                }
                cmd.args(["train", "--env", env, "--variant", variant, "--seed", &seed.to_string(), "--out"]).arg(dir);
                if let Some(n) = epochs {
                    cmd.args(["--set", &format!("epochs={n}")]);
                }
            }
            std::fs::create_dir_all(dir)?;
            let log = std::fs::File::create(dir.with_extension("log"))?;
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

/// Whether `dir/checkpoints` holds a complete (renamed) checkpoint.
fn has_checkpoint(dir: &Path) -> bool {
    std::fs::read_dir(dir.join("checkpoints"))
        .map(|r| r.flatten().any(|e| e.file_name().to_string_lossy().starts_with("step-")))
        .unwrap_or(false)
}

fn status(mut cmd: Command, what: &str) -> Result<()> {
    let st = cmd.status().with_context(|| format!("cannot start {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}
