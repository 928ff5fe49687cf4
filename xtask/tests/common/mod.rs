//! What xtask's integration tests share: the workspace root and the `ddppo`
//! binary they drive.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The `ddppo` binary of this build profile. `cargo test --workspace` (what
/// `cargo xtask test` runs) has just built it for ddppo-cli's own tests; a
/// `cargo build -p ddppo-cli` here would resolve features for that package
/// alone, rebuild part of the tree and overwrite the binary, and the next
/// workspace test run would rebuild it back. So it is built here only when it
/// is absent or older than the sources (this test file run alone, `-p xtask`).
pub fn ddppo_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/TEST-HASH
    let profile_dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let bin = profile_dir.join("ddppo");
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    if built.is_none_or(|t| t < newest_source()) {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(workspace_root()).args(["build", "--quiet", "-p", "ddppo-cli", "--bin", "ddppo"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap_or_else(|e| panic!("cannot run cargo build: {e}"));
        assert!(status.success(), "cargo build -p ddppo-cli failed");
    }
    assert!(bin.is_file(), "no ddppo binary at {}", bin.display());
    bin
}

/// The newest modification time among the files the `ddppo` binary is built
/// from: the crates' sources, manifests and build scripts, the presets, the
/// lock file.
fn newest_source() -> std::time::SystemTime {
    let root = workspace_root();
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    let mut stack = vec![root.join("Cargo.lock"), root.join("Cargo.toml")];
    for e in std::fs::read_dir(root.join("crates")).unwrap().flatten() {
        stack.extend(["src", "configs", "Cargo.toml", "build.rs"].map(|f| e.path().join(f)));
    }
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&p) else { continue };
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        } else if let Ok(t) = meta.modified() {
            newest = newest.max(t);
        }
    }
    newest
}
