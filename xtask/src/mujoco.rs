//! Fetches MuJoCo 3.17.0 and gymnasium's model XMLs into `.cache/mujoco`.
//!
//! Both come out of wheels on the Python package index, downloaded with
//! `pip download --no-deps` (so no URL lives in our code): the shared library
//! out of `mujoco==3.17.0`, the XMLs out of `gymnasium==1.4.0`. A second run
//! finds everything in place and touches no network.

use anyhow::{Context, Result, bail};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const MUJOCO_VERSION: &str = "3.17.0";
pub const GYMNASIUM_VERSION: &str = "1.4.0";
const LIB_NAME: &str = "libmujoco.so.3.17.0";
/// Model files the tasks load (gymnasium's `envs/mujoco/assets`).
pub const XMLS: &[&str] =
    &["inverted_pendulum.xml", "hopper.xml", "walker2d.xml", "half_cheetah.xml", "ant.xml", "humanoid.xml"];

/// Where MuJoCo lives for this build.
pub struct MujocoPaths {
    /// Holds `libmujoco.so` (absolute).
    pub lib_dir: PathBuf,
    /// Holds the model XMLs (absolute).
    pub assets_dir: PathBuf,
}

pub fn cache_dir(root: &Path) -> PathBuf {
    root.join(".cache")
}

/// Makes sure MuJoCo and the XMLs are present, fetching what is missing.
///
/// A user may point `DDPPO_MUJOCO_DIR` at an existing MuJoCo 3.17.0 `lib/`
/// directory; then only the XMLs are fetched.
pub fn ensure(root: &Path) -> Result<MujocoPaths> {
    let cache = cache_dir(root).join("mujoco");
    let wheels = cache_dir(root).join("wheels");
    let lib_dir = match std::env::var_os("DDPPO_MUJOCO_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            let dir =
                fs::canonicalize(&dir).with_context(|| format!("DDPPO_MUJOCO_DIR={} does not exist", dir.display()))?;
            check_user_lib(&dir)?;
            dir
        }
        None => {
            let lib_dir = cache.join("lib");
            if !lib_dir.join(LIB_NAME).is_file() {
                let wheel = pip_download(&wheels, "mujoco", MUJOCO_VERSION, true)?;
                extract(&wheel, &lib_dir, |name| (name == format!("mujoco/{LIB_NAME}")).then(|| LIB_NAME.to_string()))?;
                if !lib_dir.join(LIB_NAME).is_file() {
                    bail!(
                        "the mujoco=={MUJOCO_VERSION} wheel {} holds no mujoco/{LIB_NAME}; \
                         delete .cache/wheels and run `cargo xtask setup` again",
                        wheel.display()
                    );
                }
            }
            link_so(&lib_dir)?;
            lib_dir
        }
    };
    let assets_dir = cache.join("assets");
    if XMLS.iter().any(|x| !assets_dir.join(x).is_file()) {
        let wheel = pip_download(&wheels, "gymnasium", GYMNASIUM_VERSION, false)?;
        extract(&wheel, &assets_dir, |name| {
            let file = name.strip_prefix("gymnasium/envs/mujoco/assets/")?;
            (!file.contains('/') && file.ends_with(".xml")).then(|| file.to_string())
        })?;
        for x in XMLS {
            if !assets_dir.join(x).is_file() {
                bail!(
                    "the gymnasium=={GYMNASIUM_VERSION} wheel holds no assets/{x}; \
                     delete .cache/wheels and run `cargo xtask setup` again"
                );
            }
        }
    }
    let lib_dir = fs::canonicalize(&lib_dir)?;
    let assets_dir = fs::canonicalize(&assets_dir)?;
    Ok(MujocoPaths { lib_dir, assets_dir })
}

/// A user-provided library must be MuJoCo 3.17.0 exactly: mujoco-rs 7.0.0 is
/// built against that ABI.
fn check_user_lib(dir: &Path) -> Result<()> {
    let so = dir.join("libmujoco.so");
    if !so.exists() {
        bail!(
            "DDPPO_MUJOCO_DIR={} holds no libmujoco.so; point it at MuJoCo {MUJOCO_VERSION}'s lib/ directory \
             or unset it to let `cargo xtask setup` fetch MuJoCo",
            dir.display()
        );
    }
    let target = fs::canonicalize(&so)?;
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name != LIB_NAME && !dir.join(LIB_NAME).exists() {
        bail!(
            "DDPPO_MUJOCO_DIR={} holds {name}, but mujoco-rs 7.0.0 needs MuJoCo {MUJOCO_VERSION} ({LIB_NAME}); \
             unset DDPPO_MUJOCO_DIR to let `cargo xtask setup` fetch it",
            dir.display()
        );
    }
    Ok(())
}

fn link_so(lib_dir: &Path) -> Result<()> {
    let link = lib_dir.join("libmujoco.so");
    if fs::read_link(&link).map(|t| t == Path::new(LIB_NAME)).unwrap_or(false) {
        return Ok(());
    }
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(LIB_NAME, &link).with_context(|| format!("cannot create the link {}", link.display()))
}

/// `pip download --no-deps` of one wheel into `dir`; returns the wheel's path.
fn pip_download(dir: &Path, package: &str, version: &str, binary: bool) -> Result<PathBuf> {
    if let Some(found) = find_wheel(dir, package, version)? {
        return Ok(found);
    }
    fs::create_dir_all(dir)?;
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success()))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "MuJoCo set-up needs pip (python3 -m pip) to fetch the {package}=={version} wheel; \
                 install it (e.g. `apt-get install python3-pip`) or set DDPPO_MUJOCO_DIR"
            )
        })?;
    eprintln!("xtask: fetching {package}=={version} with pip (once; cached in .cache/wheels)");
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(dir)
        .arg(format!("{package}=={version}"));
    if binary {
        cmd.arg("--only-binary=:all:");
    }
    let out = cmd.output().context("cannot run pip")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        bail!("pip could not download {package}=={version} ({last}); check the network or set DDPPO_MUJOCO_DIR");
    }
    find_wheel(dir, package, version)?.ok_or_else(|| {
        anyhow::anyhow!("pip reported success but left no {package}-{version} wheel in {}", dir.display())
    })
}

fn find_wheel(dir: &Path, package: &str, version: &str) -> Result<Option<PathBuf>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let prefix = format!("{package}-{version}-");
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&prefix) && name.ends_with(".whl") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Extracts the members that `pick` maps to a file name into `dest`, each
/// written to a temporary name and renamed, so a broken run leaves no half file.
fn extract(wheel: &Path, dest: &Path, pick: impl Fn(&str) -> Option<String>) -> Result<()> {
    let file = fs::File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(file).with_context(|| {
        format!("{} is not a valid wheel; delete it and run `cargo xtask setup` again", wheel.display())
    })?;
    fs::create_dir_all(dest)?;
    for i in 0..zip.len() {
        let mut member = zip.by_index(i)?;
        let Some(out) = pick(member.name()) else { continue };
        let mut bytes = Vec::with_capacity(member.size() as usize);
        member
            .read_to_end(&mut bytes)
            .with_context(|| format!("corrupt member {} in {}", member.name(), wheel.display()))?;
        let tmp = dest.join(format!(".{out}.part"));
        fs::write(&tmp, &bytes)?;
        fs::rename(&tmp, dest.join(&out))?;
    }
    Ok(())
}
