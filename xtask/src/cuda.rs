//! The CUDA toolkit for `--features cuda` builds, and the stand-ins that let a
//! machine without a GPU build and check them.
//!
//! By default the toolkit comes from NVIDIA's wheels on the Python package
//! index: one `pip install --target` of `cuda-toolkit[...]==13.0.*` (a single
//! call: a second `--target` install into the same folder silently skips the
//! shared `nvidia/` package) into `.cache/cuda/toolkit`. The CUDA 12 wheels
//! ship no `nvcc`, which is why the pin is 13.0; 13.0 rather than the newest
//! because newer nvcc writes PTX that a 13.0 driver does not load. A user
//! points `DDPPO_CUDA_HOME` at a toolkit of their own (12.x or later) instead.
//!
//! No wheel holds the driver library `libcuda.so`, which cudarc links, so the
//! build links against a stand-in generated from `cuda.h`'s function names,
//! each returning `CUDA_ERROR_STUB_LIBRARY`; at run time the real driver's
//! `libcuda.so.1` is loaded (the stand-in carries that soname).
//!
//! CI checks the CUDA code with a stand-in `nvcc` that writes empty PTX: the
//! real kernel compile of candle takes a quarter of an hour on two cores and
//! checks nothing of ours.

use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The wheel toolkit's version (`cuda-toolkit==13.0.*`).
pub const WHEEL_SERIES: &str = "13.0";
/// What the build needs: the compiler with its headers and the libraries
/// candle links (cudarc asks for nvrtc, curand, cublas and cublasLt; the
/// kernels for cudart).
const WHEEL_EXTRAS: &str = "nvcc,cudart,cccl,nvrtc,cublas,curand";
/// Shared libraries the link needs under their unversioned names; the wheels
/// ship only the versioned ones.
const LINKED_LIBS: &[&str] = &["cudart", "nvrtc", "cublas", "cublasLt", "curand"];
/// `CUDA_ERROR_STUB_LIBRARY` in `cuda.h`'s `CUresult`.
const STUB_ERROR: u32 = 34;
/// The compute capability the kernels are compiled for where no GPU can be
/// asked (H100/H200).
pub const DEFAULT_COMPUTE_CAP: &str = "90";

/// A CUDA toolkit ready to build against.
pub struct CudaToolkit {
    /// The toolkit's root (`bin/nvcc`, `include/`, `lib/` or `lib64/`).
    pub home: PathBuf,
    /// (major, minor) of `nvcc --version`.
    pub version: (u32, u32),
    /// Holds the link-time stand-in `libcuda.so` when the toolkit has none.
    pub stubs: Option<PathBuf>,
    /// Where the runtime libraries are (for the binary's rpath).
    pub lib_dir: PathBuf,
}

impl CudaToolkit {
    /// Sets the variables cudarc and candle-kernels read: `CUDA_HOME` (link
    /// search), `NVCC` and `PATH` (the compiler and `nvcc --version`),
    /// `LIBRARY_PATH` (the stand-in driver library), `CUDA_COMPUTE_CAP` when
    /// no GPU can tell, and `DDPPO_CUDA_LIB_DIR` for the binary's rpath.
    pub fn apply(&self, cmd: &mut Command) {
        let bin = self.home.join("bin");
        cmd.env("CUDA_HOME", &self.home)
            .env("NVCC", bin.join("nvcc"))
            .env("PATH", prepend_path(&bin, std::env::var_os("PATH")))
            .env("DDPPO_CUDA_LIB_DIR", &self.lib_dir);
        if let Some(stubs) = &self.stubs {
            cmd.env("LIBRARY_PATH", prepend_path(stubs, std::env::var_os("LIBRARY_PATH")));
        }
        if let Some(cap) = default_compute_cap() {
            cmd.env("CUDA_COMPUTE_CAP", cap);
        }
    }
}

impl CudaToolkit {
    /// Lets a test binary built against the toolkit find its runtime libraries
    /// (cuBLAS, cuRAND, NVRTC; `ddppo` itself has them in its rpath); the
    /// driver's `libcuda.so.1` comes from the system.
    pub fn apply_runtime(&self, cmd: &mut Command) {
        cmd.env("LD_LIBRARY_PATH", prepend_path(&self.lib_dir, std::env::var_os("LD_LIBRARY_PATH")));
    }
}

/// `CUDA_COMPUTE_CAP` to set: none when the user set one or `nvidia-smi`
/// reports a GPU (candle-kernels then asks it), 90 otherwise.
pub fn default_compute_cap() -> Option<&'static str> {
    if std::env::var_os("CUDA_COMPUTE_CAP").is_some() || gpu_compute_cap().is_some() {
        return None;
    }
    Some(DEFAULT_COMPUTE_CAP)
}

fn gpu_compute_cap() -> Option<String> {
    let out = Command::new("nvidia-smi").args(["--query-gpu=compute_cap", "--format=csv,noheader"]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next()?.trim();
    (out.status.success() && !first.is_empty()).then(|| first.to_string())
}

/// Makes sure a toolkit is present: the user's (`DDPPO_CUDA_HOME`) or the
/// wheel toolkit in `.cache/cuda`, fetched when missing; plus the stand-ins.
pub fn ensure(root: &Path) -> Result<CudaToolkit> {
    let cache = root.join(".cache").join("cuda");
    let home = match std::env::var_os("DDPPO_CUDA_HOME") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            fs::canonicalize(&dir).with_context(|| format!("DDPPO_CUDA_HOME={} does not exist", dir.display()))?
        }
        None => {
            let home = cache.join("toolkit").join("nvidia").join("cu13");
            if !wheel_complete(&home) {
                pip_install(&cache)?;
            }
            link_unversioned(&home.join("lib"))?;
            fs::canonicalize(&home)?
        }
    };
    let version = toolkit_version(&home)?;
    let lib_dir = ["lib64", "lib", "targets/x86_64-linux/lib"]
        .iter()
        .map(|d| home.join(d))
        .find(|d| d.join("libcublas.so").exists())
        .with_context(|| {
            format!(
                "the CUDA toolkit at {} has no libcublas.so (in lib64/ or lib/); install its cuBLAS, cuRAND and NVRTC \
                 libraries, or unset DDPPO_CUDA_HOME to use the toolkit `cargo xtask setup --cuda` fetches",
                home.display()
            )
        })?;
    let stubs = if has_driver_lib(&home) {
        None
    } else {
        let dir = cache.join("stubs");
        let header = ["include/cuda.h", "targets/x86_64-linux/include/cuda.h"]
            .iter()
            .map(|h| home.join(h))
            .find(|h| h.is_file())
            .with_context(|| format!("the CUDA toolkit at {} has no include/cuda.h", home.display()))?;
        driver_stub(&header, &dir)?;
        Some(fs::canonicalize(&dir)?)
    };
    Ok(CudaToolkit { home, version, stubs, lib_dir })
}

/// Whether the wheel toolkit holds everything the build uses (a broken or
/// older install lacks some of it and is replaced as a whole).
fn wheel_complete(home: &Path) -> bool {
    home.join("bin/nvcc").is_file()
        && home.join("include/cuda.h").is_file()
        && home.join("include/cuda_runtime.h").is_file()
        && LINKED_LIBS.iter().all(|l| versioned_lib(&home.join("lib"), l).is_some())
}

/// One `pip install --target` into a fresh folder, renamed into place when
/// complete: pip skips packages already present in a target folder, so a
/// second install into the same one would leave it incomplete.
fn pip_install(cache: &Path) -> Result<()> {
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success()))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "CUDA set-up needs pip (python3 -m pip) to install the CUDA {WHEEL_SERIES} toolkit wheels; \
                 install it (e.g. `apt-get install python3-pip`) or point DDPPO_CUDA_HOME at a CUDA toolkit (12.x or later)"
            )
        })?;
    fs::create_dir_all(cache)?;
    let part = cache.join("toolkit.part");
    let _ = fs::remove_dir_all(&part);
    let spec = format!("cuda-toolkit[{WHEEL_EXTRAS}]=={WHEEL_SERIES}.*");
    eprintln!("xtask: installing {spec} with pip into .cache/cuda (once; about 1.2 GiB)");
    let out = Command::new(python)
        .args(["-m", "pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check", "--target"])
        .arg(&part)
        .arg(&spec)
        .output()
        .context("cannot run pip")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        let _ = fs::remove_dir_all(&part);
        bail!(
            "pip could not install {spec} ({last}); check the network, or point DDPPO_CUDA_HOME at a CUDA toolkit \
             (12.x or later)"
        );
    }
    if !wheel_complete(&part.join("nvidia").join("cu13")) {
        bail!("pip installed {spec} into {} but it lacks nvcc, cuda.h or a library the build links", part.display());
    }
    let dest = cache.join("toolkit");
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&part, &dest).with_context(|| format!("cannot move {} to {}", part.display(), dest.display()))
}

/// `libX.so.N` for `libX.so` in `dir`.
fn versioned_lib(dir: &Path, name: &str) -> Option<PathBuf> {
    let prefix = format!("lib{name}.so.");
    fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            n.strip_prefix(&prefix).is_some_and(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        })
    })
}

fn link_unversioned(lib: &Path) -> Result<()> {
    for name in LINKED_LIBS {
        let Some(target) = versioned_lib(lib, name) else {
            bail!(
                "{} holds no lib{name}.so.*; delete .cache/cuda and run `cargo xtask setup --cuda` again",
                lib.display()
            );
        };
        let link = lib.join(format!("lib{name}.so"));
        let file_name = target.file_name().map(PathBuf::from).unwrap_or_default();
        if fs::read_link(&link).is_ok_and(|t| t == file_name) {
            continue;
        }
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&file_name, &link)
            .with_context(|| format!("cannot create the link {}", link.display()))?;
    }
    Ok(())
}

/// Whether the toolkit ships a `libcuda.so` to link against (a system
/// toolkit has one in `lib64/stubs`).
fn has_driver_lib(home: &Path) -> bool {
    ["lib64/stubs", "lib/stubs", "targets/x86_64-linux/lib/stubs", "lib64", "lib"]
        .iter()
        .any(|d| home.join(d).join("libcuda.so").exists())
}

/// (major, minor) from `nvcc --version` ("... release 13.0, V13.0.88"); 12.0
/// or later, as cudarc 0.19 with candle 0.11 needs.
fn toolkit_version(home: &Path) -> Result<(u32, u32)> {
    let nvcc = home.join("bin").join("nvcc");
    let out = Command::new(&nvcc).arg("--version").output().with_context(|| {
        format!("cannot run {}; point DDPPO_CUDA_HOME at a CUDA toolkit's root (it holds bin/nvcc)", nvcc.display())
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_nvcc_version(&text)
        .with_context(|| format!("cannot read the CUDA version from `{} --version`", nvcc.display()))?;
    if version.0 < 12 {
        bail!(
            "the CUDA toolkit at {} is {}.{}; the cuda build needs 12.x or later: point DDPPO_CUDA_HOME at a newer \
             one, or unset it to use CUDA {WHEEL_SERIES} from `cargo xtask setup --cuda`",
            home.display(),
            version.0,
            version.1
        );
    }
    Ok(version)
}

pub fn parse_nvcc_version(text: &str) -> Option<(u32, u32)> {
    let rest = text.split("release ").nth(1)?;
    let number = rest.split(|c: char| c == ',' || c.is_whitespace()).next()?;
    let (major, minor) = number.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The exported names of `cuda.h`: every `CUresult CUDAAPI name(` and the
/// versioned names its `#define`s map the plain ones to, with the per-thread
/// stream variants those may expand to.
pub fn driver_symbols(header: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    // A few declarations put the name on the line after `CUresult CUDAAPI`.
    let header = header.replace("CUDAAPI\r\n", "CUDAAPI ").replace("CUDAAPI\n", "CUDAAPI ");
    for line in header.lines() {
        let line = line.trim();
        if let Some(rest) = line.split("CUDAAPI ").nth(1) {
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if name.starts_with("cu") && rest[name.len()..].trim_start().starts_with('(') {
                names.insert(name);
            }
        } else if let Some(rest) = line.strip_prefix("#define ") {
            let mut parts = rest.split_whitespace();
            let (Some(plain), Some(value)) = (parts.next(), parts.next()) else { continue };
            if !plain.starts_with("cu") {
                continue;
            }
            let inner = value.rsplit('(').next().unwrap_or(value).trim_end_matches(')');
            if inner.starts_with("cu") && inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                names.insert(inner.to_string());
                if value.contains("__CUDA_API_PT") {
                    names.insert(format!("{inner}_ptds"));
                    names.insert(format!("{inner}_ptsz"));
                }
            }
        }
    }
    names
}

/// Writes `dir/libcuda.so`: every driver function returns
/// `CUDA_ERROR_STUB_LIBRARY`; the soname is the real driver's, so the binary
/// loads the machine's driver at run time.
fn driver_stub(header: &Path, dir: &Path) -> Result<()> {
    let lib = dir.join("libcuda.so");
    let text = fs::read_to_string(header).with_context(|| format!("cannot read {}", header.display()))?;
    let names = driver_symbols(&text);
    if names.len() < 100 {
        bail!("{} declares only {} driver functions; is it CUDA's cuda.h?", header.display(), names.len());
    }
    let mut source = String::from("/* Link-time stand-in for the CUDA driver, written by `cargo xtask`. */\n");
    for name in &names {
        source.push_str(&format!("int {name}(void) {{ return {STUB_ERROR}; }}\n"));
    }
    fs::create_dir_all(dir)?;
    let c_file = dir.join("libcuda_stub.c");
    if lib.is_file() && fs::read_to_string(&c_file).is_ok_and(|s| s == source) {
        return Ok(());
    }
    fs::write(&c_file, &source)?;
    let tmp = dir.join(".libcuda.so.part");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O0", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(&tmp)
        .arg(&c_file)
        .output()
        .with_context(|| format!("the stand-in libcuda.so needs a C compiler; cannot run `{cc}`"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("`{cc}` could not build the stand-in libcuda.so: {}", err.lines().next().unwrap_or("no output"));
    }
    fs::rename(&tmp, &lib)?;
    Ok(())
}

/// The environment for `cargo check --features cuda` without a toolkit: a
/// stand-in `nvcc` (empty PTX, empty objects), the CUDA version cudarc would
/// otherwise read from `nvcc --version`, and a compute capability.
pub fn check_env(root: &Path, cmd: &mut Command) -> Result<()> {
    let dir = root.join(".cache").join("cuda").join("check-nvcc");
    let nvcc = dir.join("nvcc");
    if fs::read_to_string(&nvcc).map(|s| s != STAND_IN_NVCC).unwrap_or(true) {
        fs::create_dir_all(&dir)?;
        let tmp = dir.join(".nvcc.part");
        fs::write(&tmp, STAND_IN_NVCC)?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        fs::rename(&tmp, &nvcc)?;
    }
    let nvcc = fs::canonicalize(&nvcc)?;
    let dir = fs::canonicalize(&dir)?;
    cmd.env("NVCC", &nvcc)
        .env("PATH", prepend_path(&dir, std::env::var_os("PATH")))
        .env("CUDARC_CUDA_VERSION", "13000")
        .env("CUDA_COMPUTE_CAP", DEFAULT_COMPUTE_CAP);
    Ok(())
}

/// Handles exactly the calls cudaforge (candle-kernels' build script) and
/// cudarc make: `--version`, `--ptx --output-directory D x.cu`,
/// `-c -o x.o x.cu` and `--lib -o libx.a`.
const STAND_IN_NVCC: &str = r#"#!/bin/sh
# Stand-in nvcc written by `cargo xtask` for `cargo check --features cuda`:
# empty PTX and objects, so candle-kernels' build script passes without a toolkit.
mode=""; out=""; dir=""; src=""
while [ $# -gt 0 ]; do
  case "$1" in
    --version)
      printf 'nvcc: stand-in for cargo check\nno copyright\nno build\nCuda compilation tools, release 13.0, V13.0.0\n'
      exit 0;;
    --list-gpu-code) echo sm_90; exit 0;;
    --ptx) mode=ptx;;
    --lib) mode=lib;;
    -c) mode=obj;;
    -o) out="$2"; shift;;
    --output-directory) dir="$2"; shift;;
    *.cu) src="$1";;
  esac
  shift
done
case "$mode" in
  ptx) : > "$dir/$(basename "$src" .cu).ptx";;
  obj) : > "$out";;
  lib) printf '!<arch>\n' > "$out";;
  *) echo "stand-in nvcc: unexpected call" >&2; exit 1;;
esac
"#;

fn prepend_path(dir: &Path, old: Option<std::ffi::OsString>) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    if let Some(old) = old {
        paths.extend(std::env::split_paths(&old));
    }
    std::env::join_paths(paths).unwrap_or_else(|_| dir.as_os_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_release_from_nvcc_version() {
        let text = "nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2025 NVIDIA Corporation\n\
                    Built on Wed_Aug_20_01:58:59_PM_PDT_2025\nCuda compilation tools, release 13.0, V13.0.88\n";
        assert_eq!(parse_nvcc_version(text), Some((13, 0)));
        assert_eq!(parse_nvcc_version("Cuda compilation tools, release 11.8, V11.8.89"), Some((11, 8)));
        assert_eq!(parse_nvcc_version("no version here"), None);
    }

    #[test]
    fn driver_symbols_follow_the_version_defines() {
        let header = "#define cuMemAlloc                          cuMemAlloc_v2\n\
                      #define cuMemcpyHtoD                        __CUDA_API_PTDS(cuMemcpyHtoD_v2)\n\
                      #define CUDA_VERSION 13000\n\
                      CUresult CUDAAPI cuInit(unsigned int Flags);\n\
                      __CUDA_DEPRECATED CUresult CUDAAPI cuCtxDetach(CUcontext ctx);\n\
                      CUresult CUDAAPI cuMemAlloc(CUdeviceptr *dptr, size_t bytesize);\n\
                      CUresult CUDAAPI\ncuLinkDestroy(CUlinkState state);\n\
                      typedef CUresult (CUDAAPI *PFN_cuInit)(unsigned int);\n";
        let names: Vec<String> = driver_symbols(header).into_iter().collect();
        assert_eq!(
            names,
            [
                "cuCtxDetach",
                "cuInit",
                "cuLinkDestroy",
                "cuMemAlloc",
                "cuMemAlloc_v2",
                "cuMemcpyHtoD_v2",
                "cuMemcpyHtoD_v2_ptds",
                "cuMemcpyHtoD_v2_ptsz"
            ]
        );
    }
}
