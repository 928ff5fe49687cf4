//! `ddppo profile` on a small case (the InvertedPendulum preset, a few
//! hundred rows, one epoch, two env steps of updates): the table's columns,
//! the projection as the formula of the measured parts, the recorded
//! transitions reused by a second call, the comparison with a baseline, and
//! bad input as one line with exit code 1.

mod common;

use common::{ddppo, s, tempdir};
use serde_json::Value;
use std::path::Path;

const COLUMNS: [&str; 12] = [
    "rows",
    "k",
    "pred epochs",
    "pred s/epoch",
    "grad epochs",
    "grad s/epoch",
    "train s",
    "rollout s",
    "critic s/step",
    "policy s/step",
    "eval s",
    "projected s/1k steps",
];

fn profile(data: &Path, rows: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec![
        "profile",
        "--env",
        "inverted-pendulum",
        "--rows",
        rows,
        "--max-epochs",
        "1",
        "--update-steps",
        "2",
        "--data-dir",
        s(data),
    ];
    args.extend_from_slice(extra);
    let o = ddppo(&args);
    let (out, err) = (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string());
    assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
    (out, err)
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// The cells of the Markdown table's data rows.
fn table_rows(out: &str) -> Vec<Vec<String>> {
    let header = out.lines().position(|l| l.starts_with("| rows |")).expect("no table header");
    out.lines()
        .skip(header + 2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect())
        .collect()
}

#[test]
fn profile_table_projection_and_reused_data() {
    let dir = tempdir("profile", "small");
    let data = dir.join("data");
    let json = dir.join("p.json");
    let (out, err) = profile(&data, "250,300", &["--json", s(&json)]);
    assert!(err.contains("recording 300 transitions of inverted-pendulum"), "{err}");
    let file = data.join("inverted-pendulum-seed0.transitions");
    let recorded = std::fs::read(&file).expect("the recorded transitions");

    // Every column is there, in order.
    let header = out.lines().find(|l| l.starts_with("| rows |")).unwrap();
    let cells: Vec<&str> = header.trim_matches('|').split('|').map(str::trim).collect();
    assert_eq!(cells, COLUMNS, "{out}");

    let p: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!((p["task"].as_str(), p["variant"].as_str()), (Some("inverted-pendulum"), Some("ddppo")));
    let (freq, every, steps) = (f(&p, "model_train_freq"), f(&p, "eval_every"), f(&p, "update_steps"));
    assert_eq!((freq, every, steps), (250.0, 1000.0, 2.0));
    let rows = p["rows"].as_array().unwrap();
    let table = table_rows(&out);
    assert_eq!((rows.len(), table.len()), (2, 2), "{out}");
    for ((r, n), cells) in rows.iter().zip([250.0, 300.0]).zip(&table) {
        assert_eq!(f(r, "rows"), n);
        // The preset's schedule: k = 1, G2 = G1 = 10 per env step; one epoch
        // of each ensemble, the cap.
        assert_eq!(f(r, "k"), 1.0);
        assert_eq!((f(r, "critic_updates"), f(r, "policy_updates")), (20.0, 20.0));
        assert_eq!((f(r, "pred_epochs"), f(r, "grad_epochs")), (1.0, 1.0));
        assert_eq!(r["capped"], Value::Bool(true));
        assert!(f(r, "model_pool") > 0.0 && f(r, "model_pool") <= 100_000.0, "{r}");
        for key in ["pred_s", "grad_s", "model_train_s", "rollout_s", "critic_s", "policy_s", "eval_s"] {
            assert!(f(r, key) > 0.0, "{key}: {r}");
        }
        // Both ensembles train at once, so the call takes about the longer.
        assert!(f(r, "model_train_s") >= f(r, "pred_s").max(f(r, "grad_s")), "{r}");
        // The projection is the formula of the measured parts.
        let expect = 1000.0 / freq * (f(r, "model_train_s") + f(r, "rollout_s"))
            + 1000.0 * (f(r, "critic_s") + f(r, "policy_s")) / steps
            + 1000.0 / every * (f(r, "eval_s") + f(r, "diagnostics_s"));
        let got = f(r, "projected_s_per_1k");
        assert!((got - expect).abs() <= 1e-9 * expect, "projected {got}, formula {expect}");
        // The table shows the same figures.
        assert_eq!(cells[0], format!("{n}"));
        assert_eq!(cells[2], "1");
        assert_eq!(cells[11], format!(">={got:.1}"), "{out}");
        assert_eq!(cells[7], format!("{:.2}", f(r, "rollout_s")));
        assert_eq!(cells[8], format!("{:.4}", f(r, "critic_s") / steps));
    }
    assert!(out.contains("projected s/1k steps = 4 x (train s + rollout s)"), "{out}");
    // The trained models' figures: both ensembles at each size, in the JSON
    // and in the second table, the same numbers.
    let header = out.lines().position(|l| l.starts_with("| rows | ensemble |")).expect("no quality table");
    let quality: Vec<Vec<&str>> = out
        .lines()
        .skip(header + 2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    assert_eq!(quality.len(), 4, "{out}");
    for (r, pair) in rows.iter().zip(quality.chunks(2)) {
        let q = &r["quality"];
        for key in ["pred_holdout_mse", "grad_holdout_mse"] {
            assert!(f(q, key).is_finite(), "{key}: {q}");
        }
        let q = &q["evaluation"];
        for key in ["pred_jacobian_cos", "grad_jacobian_cos"] {
            assert!(f(q, key).is_finite(), "{key}: {q}");
        }
        // InvertedPendulum pays 1 per step whatever the action: no action cost.
        assert_eq!(f(q, "action_cost_true"), 0.0, "{q}");
        assert_eq!((pair[0][1], pair[1][1]), ("prediction", "gradient"));
        assert_eq!(pair[0][2], format!("{:.4}", f(&r["quality"], "pred_holdout_mse")));
        assert_eq!(pair[1][5], format!("{:.4}", f(q, "grad_jacobian_cos")));
        assert_eq!(pair[1][8], format!("{:.4}", f(q, "action_cost_grad")));
    }

    assert!(rows.iter().all(|r| r["gemm_bound"].as_array().is_some_and(Vec::is_empty)), "no --gemm-bound asked");

    // A second call, at a size the file holds, reuses it untouched and
    // compares with the first call's figures.
    let json2 = dir.join("p2.json");
    let (out, err) = profile(
        &data,
        "250",
        &["--baseline", s(&json), "--set", "gradient.weight=0.5", "--gemm-bound", "3", "--json", s(&json2)],
    );
    assert!(out.lines().next().is_some_and(|l| l.ends_with("--set gradient.weight=0.5")), "{out}");
    assert!(err.contains("reusing 300 recorded transitions"), "{err}");
    assert!(!err.contains("recording"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), recorded, "the recorded transitions changed");
    let base = f(&rows[0], "projected_s_per_1k");
    let line = out
        .lines()
        .find(|l| l.starts_with("| 250 |") && l.contains(&format!("| {base:.1} |")))
        .unwrap_or_else(|| panic!("no comparison row: {out}"));
    assert_eq!(line.trim_matches('|').split('|').count(), 4, "{line}");

    // --gemm-bound: each ensemble's epoch FLOPs, counted by hand for the
    // preset (obs 4, act 1: in 5; 4 x 200 SiLU layers; out 2 x 5; E = 7):
    // 250 rows hold out 50, so one minibatch of 200 rows; P = 5*200 +
    // 3*200*200 + 200*10 = 123,000, the first layer's in*h = 1,000.
    //   prediction: R = 200: 6 R P - 2 R 1000 + holdout 2*50*P per member;
    //   gradient: n = 10 > in = 5, so R = 200 + 200 * (1 + 5) = 1,400 and two
    //   (10 x 5)(5 x 5) products per point for J v and its backward pass.
    let p2: Value = serde_json::from_str(&std::fs::read_to_string(&json2).unwrap()).unwrap();
    let bounds = p2["rows"][0]["gemm_bound"].as_array().expect("gemm_bound");
    let holdout = 2.0 * 50.0 * 123_000.0;
    let pred = 7.0 * (6.0 * 200.0 * 123_000.0 - 2.0 * 200.0 * 1000.0 + holdout);
    let grad = 7.0 * (6.0 * 1400.0 * 123_000.0 - 2.0 * 1400.0 * 1000.0 + 200.0 * 2.0 * 500.0 + holdout);
    assert_eq!(bounds.len(), 2, "{p2}");
    for (b, (name, flops)) in bounds.iter().zip([("prediction", pred), ("gradient", grad)]) {
        assert_eq!(b["ensemble"].as_str(), Some(name));
        assert_eq!(f(b, "flops"), flops, "{name}");
        assert!(f(b, "epoch_s") > 0.0 && f(b, "gemm_s") > 0.0, "{b}");
        let line = out
            .lines()
            .skip_while(|l| !l.starts_with("| rows | ensemble | threads |"))
            .find(|l| l.starts_with(&format!("| 250 | {name} |")))
            .unwrap_or_else(|| panic!("no GEMM-bound row for {name}: {out}"));
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells[3], format!("{:.1}", flops / 1e9), "{line}");
        assert_eq!(cells[6], format!("{:.2}", f(b, "epoch_s") / f(b, "gemm_s")), "{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn profile_rejects_bad_input_with_one_line() {
    let dir = tempdir("profile", "bad");
    let data = dir.join("data");
    let garbage = dir.join("garbage.json");
    std::fs::write(&garbage, "not json").unwrap();
    for (args, expect) in [
        (vec!["--env", "nope"], "unknown env `nope`"),
        (vec!["--env", "inverted-pendulum", "--set", "gradient.weight=-1"], "weight"),
        (vec!["--env", "inverted-pendulum", "--set", "no_such_key=1"], "unknown field `no_such_key`"),
        (vec!["--env", "inverted-pendulum", "--variant", "nope"], "nope"),
        (vec!["--env", "inverted-pendulum", "--rows", "5"], "--rows 5 is out of range"),
        (vec!["--env", "inverted-pendulum", "--rows", "2000000"], "out of range"),
        (vec!["--env", "inverted-pendulum", "--device", "tpu"], "unknown device"),
        (vec!["--env", "inverted-pendulum", "--baseline", s(&garbage)], "is not the JSON of `ddppo profile --json`"),
    ] {
        let mut all = vec!["profile", "--data-dir", s(&data)];
        all.extend_from_slice(&args);
        let o = ddppo(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{all:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(expect), "{all:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{all:?}: {err}");
        // Nothing is recorded before the input is checked.
        assert!(!data.exists(), "{all:?} recorded data");
    }
    // A damaged data file is an error naming it, and left as it is.
    std::fs::create_dir_all(&data).unwrap();
    let file = data.join("inverted-pendulum-seed0.transitions");
    std::fs::write(&file, b"DDPPORB\0 cut short").unwrap();
    let o = ddppo(&["profile", "--env", "inverted-pendulum", "--rows", "300", "--data-dir", s(&data)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("delete it to record again") && err.trim().lines().count() == 1, "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"DDPPORB\0 cut short");
    let _ = std::fs::remove_dir_all(&dir);
}
