//! `cargo xtask gpu-check --bundle DIR`, without the CUDA build: the CPU
//! `ddppo` binary stands in for it. The bundle's layout and size limit, and
//! its `run.sh` end to end on the CPU (`DDPPO_GPU_CHECK_DEVICE=cpu`, tiny
//! sizes): the packed binary and MuJoCo library unpack and run, the profile
//! prints the CPU figures beside its own, and the agreement check's outcome
//! decides the script's exit status.

mod common;
use common::ddppo_binary;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ddppo-gpu-check-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A `ddppo profile --json` file of `task` with made-up figures at 300,
/// 5,000 and 20,000 rows (projected 1234.5 s at 300).
fn cpu_figures(dir: &Path) -> PathBuf {
    let figures = dir.join("cpu");
    std::fs::create_dir_all(&figures).unwrap();
    for task in ["hopper", "ant"] {
        let rows: Vec<serde_json::Value> = [300, 5000, 20000]
            .iter()
            .map(|&n| {
                serde_json::json!({
                    "rows": n, "k": 1, "model_pool": 100000, "pred_epochs": 3, "pred_s": 1.0, "grad_epochs": 3,
                    "grad_s": 2.0, "model_train_s": 2.0, "rollout_s": 1.0, "critic_updates": 2500, "critic_s": 10.0,
                    "policy_updates": 2500, "policy_s": 20.0, "eval_s": 1.0, "diagnostics_s": 0.5, "capped": true,
                    "projected_s_per_1k": if n == 300 { 1234.5 } else { 999.0 }
                })
            })
            .collect();
        let p = serde_json::json!({
            "task": task, "variant": "ddppo", "device": "cpu", "rayon_threads": "1", "update_steps": 250,
            "max_epochs": 3, "model_train_freq": 250, "eval_every": 1000, "rows": rows
        });
        std::fs::write(figures.join(format!("{task}.json")), p.to_string()).unwrap();
    }
    figures
}

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("gpu-check")
        .args(args)
        .env("CARGO_MANIFEST_DIR", env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run_script(bundle: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let o = Command::new("sh")
        .arg(bundle.join("run.sh"))
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("DDPPO_ASSETS_DIR")
        .env("DDPPO_GPU_CHECK_DEVICE", "cpu")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (o.status.code(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

#[test]
fn bundle_layout_and_its_script_on_the_cpu() {
    let tmp = tempdir("layout");
    let figures = cpu_figures(&tmp);
    let bundle = tmp.join("bundle");
    let ddppo = ddppo_binary();
    let o = xtask(&["--bundle", s(&bundle), "--binary", s(&ddppo), "--cpu-figures", s(&figures)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("GPU-check bundle in"), "{out}");

    // The layout: the packed binary, MuJoCo's library, the XMLs, the CPU
    // figures and the script; nothing else, and inside the limit.
    let mut names: Vec<String> =
        std::fs::read_dir(&bundle).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    assert_eq!(names, ["assets", "cpu", "ddppo.gz", "lib", "run.sh"]);
    let lib: Vec<_> = std::fs::read_dir(bundle.join("lib")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(lib.len(), 1);
    assert!(lib[0].to_string_lossy().starts_with("libmujoco.so.") && lib[0].to_string_lossy().ends_with(".gz"));
    for f in ["assets/hopper.xml", "assets/ant.xml", "cpu/hopper.json", "cpu/ant.json"] {
        assert!(bundle.join(f).is_file(), "{f} missing");
    }
    let total: u64 = walk(&bundle).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    assert!(total <= 64 << 20, "{total} bytes");
    // Stripped and compressed: well under the debug binary.
    assert!(std::fs::metadata(bundle.join("ddppo.gz")).unwrap().len() * 2 < std::fs::metadata(&ddppo).unwrap().len());

    // The script on the CPU, one tiny profile; the agreement check is left
    // out here (its own test below).
    let work = tmp.join("work");
    let (code, log) = run_script(
        &bundle,
        &[
            ("DDPPO_GPU_CHECK_TASKS", "hopper"),
            ("DDPPO_GPU_CHECK_ROWS", "300"),
            ("DDPPO_GPU_CHECK_MAX_EPOCHS", "1"),
            ("DDPPO_GPU_CHECK_UPDATE_STEPS", "1"),
            ("DDPPO_GPU_CHECK_SKIP_DEVICE_CHECK", "1"),
            ("DDPPO_GPU_CHECK_WORK", s(&work)),
        ],
    );
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("| rows | k | pred epochs"), "{log}");
    // The CPU figures beside the script's own, with their ratio.
    let row =
        log.lines().find(|l| l.starts_with("| 300 |") && l.contains("| 1234.5 |")).unwrap_or_else(|| panic!("{log}"));
    let ratio: f64 = row.trim_matches('|').split('|').nth(3).unwrap().trim().parse().unwrap();
    assert!(ratio > 0.0, "{row}");
    assert!(work.join("hopper-cpu.json").is_file() && work.join("data/hopper-seed0.transitions").is_file());
    assert!(log.contains("== done in"), "{log}");
    let _ = std::fs::remove_dir_all(&tmp);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() { files.extend(walk(&p)) } else { files.push(p) }
    }
    files
}

#[test]
fn the_agreement_check_runs_first_and_decides_the_exit_status() {
    let tmp = tempdir("device-check");
    let figures = cpu_figures(&tmp);
    // A stand-in binary that records its arguments and exits as told.
    let stub = tmp.join("stub");
    let calls = tmp.join("calls");
    std::fs::write(&stub, format!("#!/bin/sh\necho \"$@\" >> {}\nexit ${{STUB_EXIT:-0}}\n", s(&calls))).unwrap();
    let bundle = tmp.join("bundle");
    let o = xtask(&["--bundle", s(&bundle), "--binary", s(&stub), "--cpu-figures", s(&figures)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let work = tmp.join("work");
    let env = |exit: &'static str| [("DDPPO_GPU_CHECK_WORK", s(&work).to_string()), ("STUB_EXIT", exit.to_string())];
    let run = |exit| {
        let _ = std::fs::remove_file(&calls);
        let vars = env(exit);
        let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (code, log) = run_script(&bundle, &vars);
        (code, log, std::fs::read_to_string(&calls).unwrap_or_default())
    };
    let (code, log, called) = run("0");
    assert_eq!(code, Some(0), "{log}");
    let lines: Vec<&str> = called.lines().collect();
    assert_eq!(lines[0], "device-check --device cpu", "{called}");
    assert!(lines[1].starts_with("profile --env hopper --device cpu --rows 5000,20000 --max-epochs 3"), "{called}");
    assert!(lines[2].starts_with("profile --env ant"), "{called}");
    assert!(lines[1].contains(&format!("--baseline {}", s(&bundle.join("cpu/hopper.json")))), "{called}");
    let (code, log, called) = run("1");
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("device-check FAILED") && called.lines().count() == 3, "{log}");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn refusals_are_one_line_and_leave_nothing() {
    let tmp = tempdir("refusals");
    let figures = cpu_figures(&tmp);
    let ddppo = ddppo_binary();
    let refuse = |args: &[&str], expect: &str| {
        let o = xtask(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(expect), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    };
    // Over the size limit (1 MiB here): a clear error, no bundle left.
    let bundle = tmp.join("bundle");
    let args = ["--bundle", s(&bundle), "--binary", s(&ddppo), "--cpu-figures", s(&figures), "--limit-mib", "1"];
    refuse(&args, "over the 1 MiB limit");
    assert!(!bundle.exists());
    // CPU figures missing, or of other settings: the command that measures them.
    let none = tmp.join("none");
    refuse(
        &["--bundle", s(&bundle), "--binary", s(&ddppo), "--cpu-figures", s(&none)],
        "measure them first with `RAYON_NUM_THREADS=1 target/release/ddppo profile --env hopper --rows 5000,20000",
    );
    let text =
        std::fs::read_to_string(figures.join("ant.json")).unwrap().replace("\"max_epochs\":3", "\"max_epochs\":9");
    std::fs::write(figures.join("ant.json"), text).unwrap();
    refuse(&["--bundle", s(&bundle), "--binary", s(&ddppo), "--cpu-figures", s(&figures)], "max_epochs 9");
    assert!(!bundle.exists());
    // A directory that holds something is never written to.
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("mine"), "keep").unwrap();
    refuse(&["--bundle", s(&bundle), "--binary", s(&ddppo), "--cpu-figures", s(&figures)], "is not empty");
    assert_eq!(std::fs::read_to_string(bundle.join("mine")).unwrap(), "keep");
    let _ = std::fs::remove_dir_all(&tmp);
}
