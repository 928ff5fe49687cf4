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
    cmd.current_dir(root)
        .env("MUJOCO_DYNAMIC_LINK_DIR", &paths.lib_dir)
        .env("DDPPO_ASSETS_DIR", &paths.assets_dir);
    cmd
}

fn status(mut cmd: Command, what: &str) -> Result<()> {
    let st = cmd.status().with_context(|| format!("cannot start {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}
