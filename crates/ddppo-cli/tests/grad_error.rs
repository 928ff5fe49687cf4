//! `ddppo grad-error` end to end on a tiny config, and its one-line errors.
use std::path::PathBuf;
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ddppo-grad-error-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const TINY: &str = r#"
transitions = 300
test_points = 50
epochs = 3
[ensemble]
ensemble_size = 2
elites = 1
hidden = 8
hidden_layers = 1
weight_decay = [1e-4, 1e-4]
batch_size = 64
[gradient]
neighbours = 3
weight = 1.0
[linear]
a = [[0.9, 0.1], [0.0, 0.8]]
b = [[0.0], [0.1]]
q = [[1.0, 0.0], [0.0, 1.0]]
r = [[0.1]]
"#;

#[test]
fn writes_curves_summary_and_plot() {
    let dir = tmp("ok");
    let cfg = dir.join("tiny.toml");
    std::fs::write(&cfg, TINY).unwrap();
    let out = dir.join("out");
    let st = Command::new(env!("CARGO_BIN_EXE_ddppo"))
        .args(["grad-error", "--env", "linear", "--seeds", "2", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let csv = std::fs::read_to_string(out.join("curves.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "variant,seed,epoch,pred_mse,grad_mse,grad_mse_reward,grad_mse_dynamics");
    assert_eq!(lines.len(), 1 + 2 * 2 * 3, "2 seeds x 2 variants x 3 epochs");
    for l in &lines[1..] {
        let f: Vec<&str> = l.split(',').collect();
        assert!(f[3].parse::<f64>().unwrap() >= 0.0 && f[4].parse::<f64>().unwrap() >= 0.0, "{l}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["env"], "linear");
    assert_eq!(summary["seeds"], 2);
    let variants = summary["variants"].as_array().unwrap();
    assert_eq!(variants.len(), 2);
    for v in variants {
        for key in ["pred_mse", "grad_mse"] {
            assert!(v[key]["mean"].as_f64().unwrap().is_finite() && v[key]["std"].as_f64().unwrap() >= 0.0);
        }
    }
    // The state dims come from the config's 2-state system: its Jacobian is 3 x 3,
    // the final values in the summary equal the last epoch rows of the CSV.
    let last: Vec<f64> = lines[1..]
        .iter()
        .filter(|l| l.starts_with("gradient_loss,") && l.split(',').nth(2) == Some("3"))
        .map(|l| l.split(',').nth(4).unwrap().parse().unwrap())
        .collect();
    let mean = last.iter().sum::<f64>() / last.len() as f64;
    let reported = variants[0]["grad_mse"]["mean"].as_f64().unwrap();
    assert!((mean - reported).abs() <= 1e-9 * (1.0 + mean.abs()), "{mean} vs {reported}");
    let svg = std::fs::read_to_string(out.join("grad_error.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("gradient error") && svg.contains("prediction error"));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn fails(args: &[&str]) -> String {
    let st = Command::new(env!("CARGO_BIN_EXE_ddppo")).args(args).output().unwrap();
    assert_eq!(st.status.code(), Some(1), "{args:?} should exit 1");
    let err = String::from_utf8_lossy(&st.stderr).to_string();
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn bad_input_is_one_line_and_exit_1() {
    let dir = tmp("bad");
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    assert!(fails(&["grad-error", "--env", "hopper", "--out", o]).contains("pendulum, linear"));
    let file = dir.join("a-file");
    std::fs::write(&file, "x").unwrap();
    assert!(fails(&["grad-error", "--env", "linear", "--out", file.to_str().unwrap()]).contains("not a directory"));
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "epochs = -3\n").unwrap();
    let err = fails(&["grad-error", "--env", "linear", "--config", cfg.to_str().unwrap(), "--out", o]);
    assert!(err.contains("bad.toml"), "{err}");
    std::fs::write(&cfg, "[linear]\na = [[1.0]]\nb = [[1.0, 2.0]]\nq = [[1.0]]\nr = [[1.0]]\n").unwrap();
    assert!(
        fails(&["grad-error", "--env", "linear", "--config", cfg.to_str().unwrap(), "--out", o]).contains("linear")
    );
    assert!(
        fails(&["grad-error", "--env", "linear", "--config", dir.join("missing.toml").to_str().unwrap(), "--out", o])
            .contains("missing.toml")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
