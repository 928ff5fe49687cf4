//! `ddppo env list`, `ddppo env replay` and `ddppo env jacobian` end to end, and their one-line errors.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ddppo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddppo")).args(args).output().unwrap()
}

fn tmp_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ddppo-env-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8(out.stdout.clone()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Exit 1 with exactly one stderr line containing `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains(needle), "expected `{needle}` in: {stderr}");
}

#[test]
fn list_names_every_env() {
    let out = ddppo(&["env", "list"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for name in ["inverted-pendulum", "hopper", "walker2d", "half-cheetah", "ant", "humanoid", "pendulum", "linear"] {
        assert!(text.lines().any(|l| l.split_whitespace().next() == Some(name)), "{name} missing in:\n{text}");
    }
    assert!(text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()[..3] == ["ant", "27", "8"]), "{text}");
}

#[test]
fn pendulum_replay_prints_the_dynamics() {
    use ddppo_env::AnalyticDynamics;
    let input = tmp_file("pendulum.json", r#"{"state": [0.5, -0.25], "actions": [[1.0], [-3.0], [0.25]]}"#);
    let out = ddppo(&["env", "replay", "--env", "pendulum", "--input", input.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = lines(&out);
    assert_eq!(lines.len(), 3);
    let pendulum = ddppo_env::Pendulum::new();
    let mut s = vec![0.5, -0.25];
    for (line, a) in lines.iter().zip([1.0, -3.0, 0.25]) {
        let (r, next) = pendulum.transition(&s, &[a]);
        let obs: Vec<f64> = serde_json::from_value(line["obs"].clone()).unwrap();
        assert_eq!(obs, next);
        assert_eq!(line["reward"].as_f64().unwrap(), r);
        assert_eq!((line["terminated"].as_bool(), line["truncated"].as_bool()), (Some(false), Some(false)));
        s = next;
    }
}

#[cfg(feature = "mujoco")]
#[test]
fn hopper_replay_matches_gymnasium_and_stops_at_termination() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../ddppo-env/tests/fixtures/hopper.json"))
            .unwrap(),
    )
    .unwrap();
    let run = &fixture["runs"][1];
    let steps = run["actions"].as_array().unwrap().len();
    assert!(run["terminated"][steps - 1].as_bool().unwrap());
    // Extra actions after the terminating one are not applied.
    let mut actions = run["actions"].as_array().unwrap().clone();
    actions.extend(std::iter::repeat_n(serde_json::json!([0.0, 0.0, 0.0]), 5));
    let input = serde_json::json!({"qpos": run["qpos"], "qvel": run["qvel"], "actions": actions});
    let path = tmp_file("hopper.json", &input.to_string());
    let out = ddppo(&["env", "replay", "--env", "hopper", "--input", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = lines(&out);
    assert_eq!(lines.len(), steps);
    for (t, line) in lines.iter().enumerate() {
        let ours: Vec<f64> = serde_json::from_value(line["obs"].clone()).unwrap();
        let theirs: Vec<f64> = serde_json::from_value(run["obs"][t].clone()).unwrap();
        assert!(ours.iter().zip(&theirs).all(|(a, b)| (a - b).abs() <= 1e-12), "step {t}");
        assert_eq!(line["terminated"], run["terminated"][t], "step {t}");
    }
}

#[test]
fn replay_errors_are_one_line() {
    let pendulum_ok = tmp_file("ok.json", r#"{"state": [0.0, 0.0], "actions": [[0.0]]}"#);
    let p = pendulum_ok.to_str().unwrap();
    assert_one_line_error(
        &ddppo(&["env", "replay", "--env", "cheetah", "--input", p]),
        "valid names: inverted-pendulum",
    );
    assert_one_line_error(
        &ddppo(&["env", "replay", "--env", "pendulum", "--input", "no/such/file.json"]),
        "reading no/such/file.json",
    );
    let cases = [
        ("pendulum", "not json", "bad replay input"),
        ("pendulum", r#"{"state": [0.0], "actions": [[0.0]]}"#, "state has 1 values, pendulum expects 2"),
        (
            "pendulum",
            r#"{"state": [0.0, 0.0], "actions": [[0.0, 1.0]]}"#,
            "action 0: action has 2 components, pendulum expects 1",
        ),
        ("pendulum", r#"{"state": [0.0, 0.0]}"#, "missing field `actions`"),
        ("linear", r#"{"qpos": [0.0], "qvel": [0.0], "actions": []}"#, "give `state`, not `qpos`/`qvel`"),
        ("hopper", r#"{"state": [0.0], "actions": []}"#, "give `qpos` and `qvel`, not `state`"),
        ("hopper", r#"{"qpos": [0.0], "actions": []}"#, "hopper needs both `qpos` and `qvel`"),
    ];
    for (k, (env, text, needle)) in cases.into_iter().enumerate() {
        let path = tmp_file(&format!("bad{k}.json"), text);
        assert_one_line_error(&ddppo(&["env", "replay", "--env", env, "--input", path.to_str().unwrap()]), needle);
    }
}

#[cfg(feature = "mujoco")]
#[test]
fn mujoco_replay_errors_are_one_line() {
    let qpos = "[0.0, 1.25, 0.0, 0.0, 0.0, 0.0]";
    let cases = [
        (r#"{"qpos": [0.0], "qvel": [0,0,0,0,0,0], "actions": []}"#.to_string(), "qpos has 1 values, hopper expects 6"),
        (
            format!(r#"{{"qpos": {qpos}, "qvel": [0,0,0,0,0,0], "actions": [[0.0, 0.0]]}}"#),
            "action 0: action has 2 components, hopper expects 3",
        ),
    ];
    for (k, (text, needle)) in cases.into_iter().enumerate() {
        let path = tmp_file(&format!("mj{k}.json"), &text);
        assert_one_line_error(&ddppo(&["env", "replay", "--env", "hopper", "--input", path.to_str().unwrap()]), needle);
    }
}

#[cfg(feature = "mujoco")]
#[test]
fn a_diverged_simulation_is_an_error_not_a_silent_reset() {
    // MuJoCo finds qpos = 1e308 too large, resets the state and warns; the
    // replay must not print the reset pose as the step's result.
    let input = tmp_file("diverge.json", r#"{"qpos": [1e308, 0.0], "qvel": [0.0, 0.0], "actions": [[0.0], [0.0]]}"#);
    let out = ddppo(&["env", "replay", "--env", "inverted-pendulum", "--input", input.to_str().unwrap()]);
    assert_one_line_error(&out, "diverged at step 1");
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("qpos") && stderr.contains("action 0"), "{stderr}");
}

#[test]
fn jacobian_prints_the_exact_pendulum_jacobians() {
    use ddppo_env::AnalyticDynamics;
    let points = [([0.5, -0.25], 1.0), ([-3.0, 7.5], -2.5)];
    let input: Vec<_> = points.iter().map(|(s, a)| serde_json::json!({"obs": s, "action": [a]})).collect();
    let path = tmp_file("jac-pendulum.json", &serde_json::Value::from(input).to_string());
    let out = ddppo(&["env", "jacobian", "--env", "pendulum", "--input", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = lines(&out);
    assert_eq!(lines.len(), 2);
    for (line, (s, a)) in lines.iter().zip(points) {
        let rows: Vec<Vec<f64>> = serde_json::from_value(line["jacobian"].clone()).unwrap();
        assert_eq!(rows.len(), 3, "rows (r, theta', theta_dot')");
        assert!(rows.iter().all(|r| r.len() == 3), "columns (theta, theta_dot, a)");
        assert_eq!(rows.concat(), ddppo_env::Pendulum::new().jacobian(&s, &[a]));
    }
}

#[cfg(feature = "mujoco")]
#[test]
fn jacobian_of_a_mujoco_task_is_the_library_one() {
    use ddppo_env::{MujocoJacobian, MujocoModel, StepJacobian, Task};
    let obs = [0.1, 0.05, 0.2, -0.3];
    let path = tmp_file("jac-ip.json", &serde_json::json!([{"obs": obs, "action": [0.5]}]).to_string());
    let out = ddppo(&["env", "jacobian", "--env", "inverted-pendulum", "--input", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = lines(&out);
    let rows: Vec<Vec<f64>> = serde_json::from_value(lines[0]["jacobian"].clone()).unwrap();
    assert_eq!((rows.len(), rows[0].len()), (5, 5));
    let expected =
        MujocoJacobian::new(&MujocoModel::load(Task::InvertedPendulum).unwrap()).step_jacobian(&obs, &[0.5]).unwrap();
    assert_eq!(rows.concat(), expected);
}

#[test]
fn jacobian_errors_are_one_line_and_print_nothing() {
    let ok = tmp_file("jac-ok.json", r#"[{"obs": [0.0, 0.0], "action": [0.0]}]"#);
    let p = ok.to_str().unwrap();
    assert_one_line_error(
        &ddppo(&["env", "jacobian", "--env", "cheetah", "--input", p]),
        "valid names: inverted-pendulum",
    );
    assert_one_line_error(
        &ddppo(&["env", "jacobian", "--env", "pendulum", "--input", "no/such/file.json"]),
        "reading no/such/file.json",
    );
    let cases = [
        ("pendulum", "not json", "bad jacobian input"),
        ("pendulum", r#"{"obs": [0.0, 0.0], "action": [0.0]}"#, "bad jacobian input"),
        ("pendulum", r#"[{"obs": [0.0, 0.0]}]"#, "missing field `action`"),
        (
            "pendulum",
            r#"[{"obs": [0.0, 0.0], "action": [0.0]}, {"obs": [0.0], "action": [0.0]}]"#,
            "item 1: observation has 1 values, pendulum expects 2",
        ),
        (
            "linear",
            r#"[{"obs": [0.0, 0.0, 0.0], "action": [0.0]}]"#,
            "item 0: action has 1 components, linear expects 2",
        ),
        (
            "hopper",
            r#"[{"obs": [0.0, 0.0, 0.0], "action": [0.0, 0.0, 0.0]}]"#,
            "item 0: observation has 3 values, hopper expects 11",
        ),
    ];
    for (k, (env, text, needle)) in cases.into_iter().enumerate() {
        let path = tmp_file(&format!("jac-bad{k}.json"), text);
        let out = ddppo(&["env", "jacobian", "--env", env, "--input", path.to_str().unwrap()]);
        assert_one_line_error(&out, needle);
        assert!(out.stdout.is_empty(), "nothing printed before the error");
    }
}
