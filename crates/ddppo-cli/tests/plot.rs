//! `ddppo plot` on hand-made run directories.

use std::path::Path;
use std::process::Command;

fn fake_run(dir: &Path, env: &str, variant: &str, seed: u64, returns: &[f64]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.toml"), format!("task = \"{env}\"\nvariant = \"{variant}\"\nseed = {seed}\n"))
        .unwrap();
    let lines: Vec<String> = returns
        .iter()
        .enumerate()
        .map(|(i, r)| {
            format!(
                "{{\"env_steps\":{},\"return_mean\":{r},\"return_std\":1.0,\"wall_s\":{}}}",
                (i + 1) * 1000,
                i as f64 * 2.0
            )
        })
        .collect();
    std::fs::write(dir.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
}

fn ddppo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ddppo")).args(args).output().unwrap()
}

#[test]
fn plot_groups_runs_by_env_and_variant() {
    let tmp = tempdir("plot_groups");
    fake_run(&tmp.join("a"), "hopper", "ddppo", 0, &[10.0, 200.0, 900.0]);
    fake_run(&tmp.join("b"), "hopper", "ddppo", 1, &[20.0, 300.0, 1100.0]);
    fake_run(&tmp.join("c"), "hopper", "sac", 0, &[5.0, 50.0, 100.0]);
    fake_run(&tmp.join("d"), "ant", "ddppo", 0, &[1.0, 2.0, 3.0]);
    let out = tmp.join("curves.svg");
    let o = ddppo(&[
        "plot",
        tmp.join("a").to_str().unwrap(),
        tmp.join("b").to_str().unwrap(),
        tmp.join("c").to_str().unwrap(),
        tmp.join("d").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.starts_with("<svg"));
    // One panel per env, one legend entry per variant within it.
    let texts = svg_texts(&svg);
    let count = |t: &str| texts.iter().filter(|x| x.as_str() == t).count();
    assert_eq!((count("hopper"), count("ant")), (1, 1), "panel titles: {texts:?}");
    assert_eq!(count("ddppo"), 2, "{texts:?}");
    assert_eq!(count("sac"), 1, "{texts:?}");

    // --labels: one name per run in place of the variant; the same name is one curve.
    let labelled = tmp.join("labelled.svg");
    let runs = ["a", "b", "c"].map(|r| tmp.join(r).display().to_string());
    let o =
        ddppo(&["plot", &runs[0], &runs[1], &runs[2], "--labels", "old,new,new", "--out", labelled.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let texts = svg_texts(&std::fs::read_to_string(&labelled).unwrap());
    let count = |t: &str| texts.iter().filter(|x| x.as_str() == t).count();
    assert_eq!((count("old"), count("new"), count("ddppo"), count("sac")), (1, 1, 0, 0), "{texts:?}");
    let o = ddppo(&["plot", &runs[0], &runs[1], "--labels", "one", "--out", labelled.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--labels names 1 curves for 2 run directories"));
}

#[test]
fn plot_rejects_bad_input_with_one_line() {
    let tmp = tempdir("plot_bad");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![tmp.join("missing").display().to_string()], "not a run directory"),
        (
            vec![{
                let d = tmp.join("corrupt");
                fake_run(&d, "hopper", "ddppo", 0, &[1.0]);
                std::fs::write(d.join("metrics.jsonl"), "{not json\n").unwrap();
                d.display().to_string()
            }],
            "not a metrics record",
        ),
    ];
    for (runs, expect) in cases {
        let mut args = vec!["plot".to_string()];
        args.extend(runs);
        args.extend(["--out".into(), tmp.join("x.svg").display().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = ddppo(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(expect), "expected '{expect}' in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
        assert!(!err.contains("panicked"));
    }
    let d = tmp.join("ok");
    fake_run(&d, "hopper", "ddppo", 0, &[1.0, 2.0]);
    let o = ddppo(&["plot", d.to_str().unwrap(), "--out", tmp.join("x.png").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("only .svg"));
}

/// The SVG's `<text>` elements: their attributes and their contents, trimmed.
fn svg_text_elements(svg: &str) -> Vec<(&str, String)> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let (attrs, rest) = t.split_once('>')?;
            Some((attrs, rest.split_once("</text>")?.0.trim().to_string()))
        })
        .collect()
}

/// The contents of the SVG's `<text>` elements, trimmed.
fn svg_texts(svg: &str) -> Vec<String> {
    svg_text_elements(svg).into_iter().map(|(_, text)| text).collect()
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ddppo-cli-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn table_reports_mean_and_std_over_seeds() {
    let tmp = tempdir("table");
    fake_run(&tmp.join("a"), "hopper", "ddppo", 0, &[10.0, 200.0]);
    fake_run(&tmp.join("b"), "hopper", "ddppo", 1, &[20.0, 400.0]);
    fake_run(&tmp.join("c"), "hopper", "sac", 0, &[5.0, 50.0]);
    let dirs: Vec<String> = ["a", "b", "c"].iter().map(|d| tmp.join(d).display().to_string()).collect();
    let mut args = vec!["table"];
    args.extend(dirs.iter().map(String::as_str));
    args.extend(["--at", "1000,2000"]);
    let o = ddppo(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8(o.stdout).unwrap();
    // ddppo at 2000 steps: returns 200 and 400 -> 300 ± 100 (population std).
    assert!(table.contains("| hopper | ddppo | 2 | 15.0 ± 5.0 | 300.0 ± 100.0 |"), "{table}");
    assert!(table.contains("| hopper | sac | 1 | 5.0 ± 0.0 | 50.0 ± 0.0 |"), "{table}");
}

/// A run whose records carry the Jacobian-error columns (null before the
/// first model training, as `ddppo train` writes them).
fn fake_jacobian_run(dir: &Path, variant: &str, seed: u64, errors: &[Option<f64>]) {
    fake_run(dir, "hopper", variant, seed, &vec![0.0; errors.len()]);
    let lines: Vec<String> = errors
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let e = e.map_or("null".to_string(), |x| x.to_string());
            format!("{{\"env_steps\":{},\"return_mean\":0.0,\"grad_jacobian_mse_dynamics\":{e},\"phase_s\":{{\"critic\":{i}}}}}", (i + 1) * 1000)
        })
        .collect();
    std::fs::write(dir.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
}

#[test]
fn plot_draws_any_metric_column() {
    let tmp = tempdir("plot_metric");
    fake_jacobian_run(&tmp.join("a"), "ddppo", 0, &[None, Some(0.5), Some(0.25)]);
    fake_jacobian_run(&tmp.join("b"), "no-grad-loss", 0, &[None, Some(2.0), Some(1.5)]);
    fake_run(&tmp.join("c"), "hopper", "sac", 0, &[1.0, 2.0, 3.0]);
    let runs: Vec<String> = ["a", "b", "c"].iter().map(|d| tmp.join(d).display().to_string()).collect();
    let out = tmp.join("jac.svg");
    let mut args = vec!["plot"];
    args.extend(runs.iter().map(String::as_str));
    args.extend(["--metric", "grad_jacobian_mse_dynamics", "--log-y", "--out", out.to_str().unwrap()]);
    let o = ddppo(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let texts = svg_texts(&std::fs::read_to_string(&out).unwrap());
    let count = |t: &str| texts.iter().filter(|x| x.as_str() == t).count();
    // The sac run has no such column and no curve; the others one each.
    assert_eq!((count("ddppo"), count("no-grad-loss"), count("sac")), (1, 1, 0), "{texts:?}");
    assert_eq!(count("grad_jacobian_mse_dynamics"), 1, "the y label: {texts:?}");
    // Nested columns by their CSV name.
    let o = ddppo(&["plot", &runs[0], "--metric", "phase_s.critic", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A column no run has: one line naming the columns there are.
    let o = ddppo(&["plot", &runs[0], &runs[2], "--metric", "jacobian_mse", "--out", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("no run has a value in column `jacobian_mse`") && err.contains("grad_jacobian_mse_dynamics"),
        "{err}"
    );
}

/// The y axis's tick labels: the `<text>` elements anchored at their end.
fn y_tick_labels(svg: &str) -> Vec<String> {
    svg_text_elements(svg)
        .into_iter()
        .filter(|(attrs, _)| attrs.contains("text-anchor=\"end\""))
        .map(|(_, text)| text)
        .collect()
}

/// The y tick values of `ddppo plot --log-y` over a fake run whose
/// `grad_jacobian_mse_dynamics` column holds `values`.
fn log_y_tick_values(name: &str, values: &[Option<f64>]) -> Vec<f64> {
    let tmp = tempdir(name);
    fake_jacobian_run(&tmp.join("a"), "ddppo", 0, values);
    let out = tmp.join("log.svg");
    let o = ddppo(&[
        "plot",
        tmp.join("a").to_str().unwrap(),
        "--metric",
        "grad_jacobian_mse_dynamics",
        "--log-y",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let labels = y_tick_labels(&std::fs::read_to_string(&out).unwrap());
    labels.iter().map(|l| l.parse().unwrap_or_else(|_| panic!("tick {l:?} of {labels:?}"))).collect()
}

/// A log axis over data within one decade (0.88 to 1.26) still reads: it
/// used to get a single label, `1e0`, the only power of ten in its range.
#[test]
fn log_axis_within_a_decade_has_readable_ticks() {
    let values = log_y_tick_values("plot_log_narrow", &[Some(1.26), Some(1.0), Some(0.88)]);
    assert!(values.len() >= 3, "{values:?}");
    assert!(values.iter().any(|v| *v < 1.0) && values.iter().any(|v| *v > 1.0), "{values:?}");
    // The axis is padded to 0.8 x the smallest and 1.25 x the largest value.
    assert!(values.iter().all(|v| (0.88 * 0.8..=1.26 * 1.25).contains(v)), "{values:?}");
}

/// A metric of one value on a log axis: the axis spans a factor of 2 either
/// side (then the 1.25 margin), so every tick is positive. Adding 1 either
/// side, as a linear axis does, took the axis below zero for values under 1.
#[test]
fn log_axis_of_one_value_has_positive_ticks() {
    let values = log_y_tick_values("plot_log_flat", &[Some(0.5), Some(0.5), Some(0.5)]);
    assert!(values.len() >= 3, "{values:?}");
    assert!(values.iter().all(|v| (0.2..=1.25).contains(v)), "{values:?}");
}

/// A run whose records carry `wall_s` and `phase_s`, one per (wall, model_train, policy, return),
/// and, given `epochs`, `model_epochs` and `grad_model_epochs`.
fn fake_timed_run(dir: &Path, records: &[(f64, f64, f64, f64)], epochs: Option<&[(u64, u64)]>) {
    fake_run(dir, "hopper", "ddppo", 0, &[]);
    let lines: Vec<String> = records
        .iter()
        .enumerate()
        .map(|(i, (wall, train, policy, ret))| {
            let epochs = epochs
                .map(|e| format!(",\"model_epochs\":{},\"grad_model_epochs\":{}", e[i].0, e[i].1))
                .unwrap_or_default();
            format!(
                "{{\"env_steps\":{},\"return_mean\":{ret},\"model_loss\":-3.5,\"wall_s\":{wall},\
                 \"phase_s\":{{\"model_train\":{train},\"policy\":{policy}}}{epochs}}}",
                (i + 1) * 1000
            )
        })
        .collect();
    std::fs::write(dir.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
}

#[test]
fn table_time_reports_segment_seconds_ratios_and_identity() {
    let tmp = tempdir("table_time");
    let epochs = [(0, 0), (5, 7), (12, 30)];
    fake_timed_run(
        &tmp.join("before"),
        &[(0.0, 0.0, 0.0, 1.0), (10.0, 5.0, 3.0, 2.0), (110.0, 65.0, 33.0, 3.0)],
        Some(&epochs),
    );
    fake_timed_run(
        &tmp.join("after"),
        &[(0.0, 0.0, 0.0, 1.0), (8.0, 4.0, 2.0, 2.0), (58.0, 29.0, 17.0, 3.0)],
        Some(&epochs),
    );
    // No epoch counts: logged by an older binary.
    fake_timed_run(&tmp.join("other"), &[(0.0, 0.0, 0.0, 1.0), (9.0, 4.0, 2.0, 2.0), (209.0, 124.0, 62.0, 4.5)], None);
    let runs = ["before", "after", "other"].map(|r| tmp.join(r).display().to_string());
    let rows = |out: &[u8]| -> Vec<Vec<String>> {
        let text = String::from_utf8(out.to_vec()).unwrap();
        text.lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| run |"))
            .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect())
            .collect()
    };

    let o = ddppo(&["table", "--time", &runs[0], &runs[1], &runs[2], "--at", "2000,3000"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let header = String::from_utf8(o.stdout.clone()).unwrap();
    // Phases ordered by the first run's seconds: model_train (60) before policy (30).
    assert!(header.contains("| run | env | variant | wall s | model_train s | policy s | rest s |"), "{header}");
    let r = rows(&o.stdout);
    assert_eq!(r.len(), 3, "{r:?}");
    // before: 100 s wall, 60 + 30 in phases, 10 elsewhere.
    // The epochs of the trainings in the segment: the record at 3,000's.
    assert_eq!(r[0], ["before", "hopper", "ddppo", "100.0", "60.0", "30.0", "10.0", "12", "30", "1.00", "–"]);
    // after: half the wall time, and every value at 2,000 and 3,000 equal to before's
    // (env_steps, return_mean, model_loss, both epoch counts at both ends: 10 values).
    assert_eq!(
        r[1],
        ["after", "hopper", "ddppo", "50.0", "25.0", "15.0", "10.0", "12", "30", "0.50", "yes (10 values)"]
    );
    // other: twice the time, and its return at 3,000 differs.
    assert_eq!(
        r[2],
        ["other", "hopper", "ddppo", "200.0", "120.0", "60.0", "20.0", "–", "–", "2.00", "no: 1 differ (return_mean)"]
    );

    // Default segment: the first and last evaluations every run has.
    let o = ddppo(&["table", "--time", &runs[0], &runs[1]]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("Seconds from 1000 to 3000 env steps."));
    assert_eq!(rows(&o.stdout)[1][3], "58.0");
    // Two records in that segment: their epochs add up.
    assert_eq!(rows(&o.stdout)[0][7..9], ["17", "37"]);

    // Bad segments: one line each, non-zero exit.
    for (at, says) in [
        ("2000,5000", "no evaluation at 5000 env steps (it has 1000 to 3000)"),
        ("3000,2000", "FROM < TO"),
        ("1000,2000,3000", "two env-step counts"),
    ] {
        let o = ddppo(&["table", "--time", &runs[0], "--at", at]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says) && err.trim().lines().count() == 1, "{at}: {err}");
    }
}
