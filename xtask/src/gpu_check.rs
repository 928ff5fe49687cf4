//! `cargo xtask gpu-check --bundle DIR`: one directory to copy to a GPU
//! machine and run there (issue 15). It holds the `ddppo` binary (built with
//! `--features cuda`; `ddppo device-check` and `ddppo profile` are in it),
//! compressed, MuJoCo's library and model XMLs, the CPU figures of `ddppo
//! profile` measured beforehand on this machine, and `run.sh`, which runs the
//! CPU/CUDA agreement checks and then profiles the Hopper and Ant presets on
//! the GPU, printing its projection beside the CPU's.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The most the bundle may weigh (the GPU machine's upload limit).
pub const LIMIT_MIB: u64 = 64;
/// Presets the script profiles.
pub const TASKS: [&str; 2] = ["hopper", "ant"];
/// Sizes of `D_env` it profiles at.
pub const ROWS: [usize; 2] = [5_000, 20_000];
/// Epoch cap of the profiled model trainings: a full training at 20,000 rows
/// runs for hours on a CPU, and the script has to finish in 8 minutes.
pub const MAX_EPOCHS: usize = 3;

/// What goes into a bundle.
pub struct Inputs {
    /// The `ddppo` binary (the CUDA build; a CPU build in the tests).
    pub binary: PathBuf,
    /// `TASK.json` of `ddppo profile --json` for each of [`TASKS`].
    pub cpu_figures: PathBuf,
    /// MuJoCo's `lib/` directory.
    pub mujoco_lib: PathBuf,
    /// gymnasium's model XMLs.
    pub assets: PathBuf,
    /// Size limit in MiB ([`LIMIT_MIB`]; smaller in the tests).
    pub limit_mib: u64,
}

/// The command that measures a task's CPU figures.
pub fn cpu_profile_command(task: &str, out: &Path) -> String {
    let rows = ROWS.map(|r| r.to_string()).join(",");
    format!(
        "RAYON_NUM_THREADS=1 target/release/ddppo profile --env {task} --rows {rows} --max-epochs {MAX_EPOCHS} \
         --json {}",
        out.join(format!("{task}.json")).display()
    )
}

/// Writes the bundle into `dir` (absent or empty) and returns its size in
/// bytes. Over the limit, nothing is left behind.
pub fn make(dir: &Path, inputs: &Inputs) -> Result<u64> {
    if dir.exists()
        && std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?.next().is_some()
    {
        bail!("--bundle {} is not empty; give a new directory", dir.display());
    }
    if !inputs.binary.is_file() {
        bail!("no ddppo binary at {}", inputs.binary.display());
    }
    let figures = TASKS.map(|t| inputs.cpu_figures.join(format!("{t}.json")));
    for (task, file) in TASKS.iter().zip(&figures) {
        check_figures(task, file).with_context(|| {
            format!("CPU figures: measure them first with `{}`", cpu_profile_command(task, &inputs.cpu_figures))
        })?;
    }
    let lib = std::fs::read_dir(&inputs.mujoco_lib)
        .with_context(|| format!("cannot read MuJoCo's lib dir {}", inputs.mujoco_lib.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libmujoco.so.")) && !p.is_symlink())
        .with_context(|| format!("no libmujoco.so.* in {}", inputs.mujoco_lib.display()))?;

    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let built = fill(dir, inputs, &figures, &lib).and_then(|()| {
        let bytes = size(dir)?;
        let limit = inputs.limit_mib * 1024 * 1024;
        if bytes > limit {
            bail!(
                "the bundle would be {:.1} MiB, over the {} MiB limit (binary {:.1} MiB compressed); build a smaller \
                 binary (e.g. without debug info) or leave MuJoCo's library out",
                bytes as f64 / 1048576.0,
                inputs.limit_mib,
                size(&dir.join(binary_name(dir)))? as f64 / 1048576.0
            );
        }
        Ok(bytes)
    });
    if built.is_err() {
        let _ = std::fs::remove_dir_all(dir);
    }
    built
}

fn fill(dir: &Path, inputs: &Inputs, figures: &[PathBuf], lib: &Path) -> Result<()> {
    let work = dir.join(".pack");
    std::fs::create_dir_all(&work)?;
    // Debug info is of no use there and weighs more than the code.
    let stripped = work.join("ddppo");
    let strip = Command::new("strip").arg("-o").arg(&stripped).arg(&inputs.binary).stderr(Stdio::null()).status();
    let binary = if strip.is_ok_and(|s| s.success()) { stripped.clone() } else { inputs.binary.clone() };
    // gzip is on every Linux; xz (often smaller by half) only where needed.
    let limit = inputs.limit_mib * 1024 * 1024;
    compress("gzip", &binary, &dir.join("ddppo.gz"))?;
    if size(&dir.join("ddppo.gz"))? > limit.saturating_sub(8 * 1024 * 1024) {
        compress("xz", &binary, &dir.join("ddppo.xz"))?;
        std::fs::remove_file(dir.join("ddppo.gz"))?;
    }
    std::fs::remove_dir_all(&work)?;

    let lib_dir = dir.join("lib");
    std::fs::create_dir_all(&lib_dir)?;
    let name = lib.file_name().context("MuJoCo library without a name")?.to_string_lossy().to_string();
    compress("gzip", lib, &lib_dir.join(format!("{name}.gz")))?;

    let assets = dir.join("assets");
    std::fs::create_dir_all(&assets)?;
    for e in std::fs::read_dir(&inputs.assets).with_context(|| format!("cannot read {}", inputs.assets.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "xml") {
            std::fs::copy(&p, assets.join(p.file_name().context("asset without a name")?))?;
        }
    }
    let cpu = dir.join("cpu");
    std::fs::create_dir_all(&cpu)?;
    for (task, file) in TASKS.iter().zip(figures) {
        std::fs::copy(file, cpu.join(format!("{task}.json")))?;
    }
    let script = dir.join("run.sh");
    std::fs::write(&script, run_script())?;
    set_executable(&script)?;
    Ok(())
}

fn binary_name(dir: &Path) -> &'static str {
    if dir.join("ddppo.xz").exists() { "ddppo.xz" } else { "ddppo.gz" }
}

/// The file is `ddppo profile --json` output for `task` at every size of
/// [`ROWS`] with the script's epoch cap, so that the rows compare.
fn check_figures(task: &str, file: &Path) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    if v["task"].as_str() != Some(task) {
        bail!("{} is a profile of {}, not {task}", file.display(), v["task"]);
    }
    if v["max_epochs"].as_u64() != Some(MAX_EPOCHS as u64) {
        bail!("{} was measured with max_epochs {}, the script uses {MAX_EPOCHS}", file.display(), v["max_epochs"]);
    }
    let rows: Vec<u64> = v["rows"].as_array().into_iter().flatten().filter_map(|r| r["rows"].as_u64()).collect();
    if let Some(missing) = ROWS.iter().find(|r| !rows.contains(&(**r as u64))) {
        bail!("{} has no figures at {missing} rows", file.display());
    }
    Ok(())
}

fn compress(tool: &str, from: &Path, to: &Path) -> Result<()> {
    let out = std::fs::File::create(to).with_context(|| format!("cannot create {}", to.display()))?;
    let mut cmd = Command::new(tool);
    if tool == "xz" {
        cmd.args(["-9", "-T1"]);
    } else {
        cmd.arg("-9");
    }
    let status = cmd
        .arg("-c")
        .arg(from)
        .stdout(out)
        .status()
        .with_context(|| format!("cannot run {tool} (install it, e.g. apt-get install {tool})"))?;
    if !status.success() {
        bail!("{tool} failed on {}", from.display());
    }
    Ok(())
}

fn size(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for e in std::fs::read_dir(path)? {
        total += size(&e?.path())?;
    }
    Ok(total)
}

#[cfg(unix)]
fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(not(unix))]
fn set_executable(_: &Path) -> Result<()> {
    Ok(())
}

/// The script run on the GPU machine. The `DDPPO_GPU_CHECK_*` variables
/// change what it runs (the tests run it on a CPU with tiny sizes).
pub fn run_script() -> String {
    let rows = ROWS.map(|r| r.to_string()).join(",");
    let tasks = TASKS.join(" ");
    format!(
        r#"#!/bin/sh
# The GPU check of DDPPO (made by `cargo xtask gpu-check`). On a machine with
# an NVIDIA GPU, a CUDA 13 driver (libcuda.so.1) and the CUDA 13 runtime
# libraries (libcublas.so.13, libcublasLt.so.13, libcurand.so.10) on the
# library path:
#   sh run.sh
# 1. `ddppo device-check`: the CPU/CUDA agreement checks (exit status 1 on a
#    failure; the profiles below still run);
# 2. `ddppo profile` of the {tasks} presets at {rows} transitions
#    (--max-epochs {MAX_EPOCHS}), each with the projected seconds per 1,000 env
#    steps beside the CPU figures measured before on the build machine (cpu/).
# Meant to take under 8 minutes. Everything it writes goes to $WORK.
# Overrides: DDPPO_GPU_CHECK_DEVICE (cuda), _TASKS ("{tasks}"), _ROWS ({rows}),
# _MAX_EPOCHS ({MAX_EPOCHS}), _UPDATE_STEPS (250), _WORK (work/ beside this script),
# _SKIP_DEVICE_CHECK (set: profiles only).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
DEVICE=${{DDPPO_GPU_CHECK_DEVICE:-cuda}}
TASKS=${{DDPPO_GPU_CHECK_TASKS:-{tasks}}}
ROWS=${{DDPPO_GPU_CHECK_ROWS:-{rows}}}
MAX_EPOCHS=${{DDPPO_GPU_CHECK_MAX_EPOCHS:-{MAX_EPOCHS}}}
UPDATE_STEPS=${{DDPPO_GPU_CHECK_UPDATE_STEPS:-250}}
WORK=${{DDPPO_GPU_CHECK_WORK:-$HERE/work}}
START=$(date +%s)
mkdir -p "$WORK/lib" || exit 1
if [ -f "$HERE/ddppo.xz" ]; then
    if ! command -v xz >/dev/null 2>&1; then
        echo "error: xz is needed to unpack ddppo.xz (apt-get install xz-utils)" >&2
        exit 1
    fi
    xz -dc "$HERE/ddppo.xz" > "$WORK/ddppo" || exit 1
else
    gzip -dc "$HERE/ddppo.gz" > "$WORK/ddppo" || exit 1
fi
chmod +x "$WORK/ddppo"
for lib in "$HERE"/lib/*.gz; do
    gzip -dc "$lib" > "$WORK/lib/$(basename "$lib" .gz)" || exit 1
done
LD_LIBRARY_PATH="$WORK/lib${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"
for d in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64; do
    [ -d "$d" ] && LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"
done
export LD_LIBRARY_PATH
export DDPPO_ASSETS_DIR="$HERE/assets"
export RAYON_NUM_THREADS=${{RAYON_NUM_THREADS:-1}}
failed=0

if [ -n "${{DDPPO_GPU_CHECK_SKIP_DEVICE_CHECK:-}}" ]; then
    echo "== ddppo device-check skipped (DDPPO_GPU_CHECK_SKIP_DEVICE_CHECK)"
else
    echo "== ddppo device-check --device $DEVICE"
    if ! "$WORK/ddppo" device-check --device "$DEVICE"; then
        echo "device-check FAILED"
        failed=1
    fi
fi
for task in $TASKS; do
    echo "== ddppo profile --env $task --device $DEVICE (CPU figures from the build machine beside it)"
    if [ -f "$HERE/cpu/$task.json" ]; then set -- --baseline "$HERE/cpu/$task.json"; else set --; fi
    if ! "$WORK/ddppo" profile --env "$task" --device "$DEVICE" --rows "$ROWS" --max-epochs "$MAX_EPOCHS" \
        --update-steps "$UPDATE_STEPS" --data-dir "$WORK/data" --json "$WORK/$task-$DEVICE.json" "$@"; then
        echo "profile of $task FAILED"
        failed=1
    fi
done
echo "== done in $(( $(date +%s) - START )) s; figures in $WORK"
exit $failed
"#
    )
}
