//! `cargo xtask`: developer automation. Sets up MuJoCo, runs the tests, and
//! drives training runs and ablations through the `ddppo` binary. It holds no
//! product logic.

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
    Setup,
    /// Set up, then run the whole test suite (what CI runs).
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
        Task::Setup => {
            let paths = mujoco::ensure(&root)?;
            println!("MuJoCo {} in {}", mujoco::MUJOCO_VERSION, paths.lib_dir.display());
            println!("model XMLs in {}", paths.assets_dir.display());
        }
        Task::Test { args } => {
            let paths = mujoco::ensure(&root)?;
            let mut cmd = cargo(&root, &paths);
            cmd.args(["test", "--workspace"]).args(&args);
            status(cmd, "cargo test")?;
        }
        Task::Train { env, variant, seed, out, extra } => {
            let ddppo = build_cli(&root)?;
            let out = out.unwrap_or_else(|| root.join("runs").join(format!("{env}-{variant}-s{seed}")));
            // `ddppo train --out` continues the run a directory already holds
            // (the same command again after an interruption).
            println!("training {env} ({variant}, seed {seed}); the run goes to {}", out.display());
            let mut cmd = Command::new(&ddppo);
            cmd.args(["train", "--env", &env, "--variant", &variant, "--seed", &seed.to_string(), "--out"])
                .arg(&out)
                .args(&extra);
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
            let ddppo = build_cli(&root)?;
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

/// Sets up MuJoCo and builds the `ddppo` binary in release mode; returns its path.
fn build_cli(root: &Path) -> Result<PathBuf> {
    let paths = mujoco::ensure(root)?;
    let mut cmd = cargo(root, &paths);
    cmd.args(["build", "--release", "--quiet", "-p", "ddppo-cli"]);
    status(cmd, "cargo build --release")?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
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

/// Runs one `ddppo train` per entry of `runs`, `jobs` at a time; a run that
/// was stopped continues from its newest checkpoint (or from step 0), a
/// finished one is left as it is.
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
            // The one rule for a run directory (in `ddppo train`): a run that
            // was stopped continues, a finished one is left as it is.
            let mut cmd = Command::new(ddppo);
            cmd.args(["train", "--env", env, "--variant", variant, "--seed", &seed.to_string(), "--out"]).arg(dir);
            if let Some(n) = epochs {
                cmd.args(["--set", &format!("epochs={n}")]);
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

fn status(mut cmd: Command, what: &str) -> Result<()> {
    let st = cmd.status().with_context(|| format!("cannot start {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}
