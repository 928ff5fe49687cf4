//! The presets hold Table 1's values; bad configs fail with a clear error.

#![allow(clippy::type_complexity, clippy::field_reassign_with_default)]

use ddppo_agent::{AgentConfig, Overrides, RolloutSchedule, Variant};

#[test]
fn presets_parse_and_hold_table_1() {
    // (task, epochs, H, n, w, warm-up, schedule) from Table 1 and appendix B.2.
    let table: [(&str, usize, usize, usize, f64, usize, [usize; 4]); 6] = [
        ("inverted-pendulum", 15, 3, 10, 10.0, 200, [1, 15, 1, 1]),
        ("hopper", 100, 2, 25, 50.0, 5000, [25, 155, 1, 15]),
        ("walker2d", 100, 3, 25, 0.1, 5000, [1, 100, 1, 1]),
        ("half-cheetah", 100, 3, 25, 1.0, 5000, [1, 100, 1, 1]),
        ("ant", 150, 3, 5, 0.1, 5000, [1, 150, 1, 1]),
        ("humanoid", 150, 3, 5, 0.1, 5000, [25, 155, 1, 25]),
    ];
    for (task, epochs, h, n, w, warm, sched) in table {
        let c = AgentConfig::preset(task).unwrap_or_else(|e| panic!("{task}: {e}"));
        assert_eq!(c.task, task);
        assert_eq!((c.epochs, c.horizon, c.gradient.neighbours), (epochs, h, n), "{task}");
        assert_eq!(c.gradient.weight, w, "{task}");
        assert_eq!((c.start_steps, c.min_pool_size), (warm, warm), "{task}");
        assert_eq!(c.rollout_schedule, RolloutSchedule(sched), "{task}");
        assert_eq!(
            (c.epoch_length, c.model.ensemble_size, c.policy_updates_per_step, c.critic_updates_per_step),
            (1000, 7, 10, 10)
        );
        assert_eq!(c.variant, Variant::Ddppo);
        // The file on disk is the compiled-in one.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs").join(format!("{task}.toml"));
        assert_eq!(AgentConfig::from_file(&path).unwrap(), c);
    }
    assert!(AgentConfig::preset("pendulum").is_ok());
    let e = AgentConfig::preset("cartpole").unwrap_err().to_string();
    assert!(e.contains("hopper"), "{e}");
}

#[test]
fn config_round_trips_through_toml() {
    let c = AgentConfig::preset("hopper").unwrap();
    assert_eq!(AgentConfig::from_toml_str(&c.to_toml().unwrap()).unwrap(), c);
}

#[test]
fn rollout_schedule_is_linear_and_clamped() {
    let s = RolloutSchedule([25, 155, 1, 15]);
    assert_eq!(s.length(0), 1);
    assert_eq!(s.length(25), 1);
    assert_eq!(s.length(90), 8); // 1 + 65/130 * 14 = 8
    assert_eq!(s.length(155), 15);
    assert_eq!(s.length(1000), 15);
    assert_eq!(RolloutSchedule([1, 15, 1, 1]).length(7), 1);
}

#[test]
fn model_pool_size_follows_section_1() {
    let mut c = AgentConfig::default();
    c.retain_epochs = 2;
    // 2 * 100_000 * 1000 / 250 * 3
    assert_eq!(c.model_pool_size(3), 2_400_000);
}

#[test]
fn double_params_width_doubles_the_parameter_count() {
    let c = AgentConfig::default();
    let (i, o) = (27 + 8, 2 * 28);
    let count = |h: usize| i * h + h + 3 * (h * h + h) + h * o + o;
    let h = c.double_params_width(27, 8);
    let ratio = count(h) as f64 / count(200) as f64;
    assert!((ratio - 2.0).abs() < 0.01, "width {h}: ratio {ratio}");
}

fn err(text: &str) -> String {
    let base = "task = \"pendulum\"\n";
    AgentConfig::from_toml_str(&format!("{base}{text}")).expect_err(text).to_string()
}

#[test]
fn bad_values_are_rejected_with_the_key_named() {
    assert!(err("policy_lr = -0.001").contains("policy_lr"));
    assert!(err("real_ratio = 1.5").contains("real_ratio"));
    assert!(err("horizon = 0").contains("horizon"));
    assert!(err("[gradient]\nneighbours = 0").contains("neighbours"));
    assert!(err("gamma = 0.0").contains("gamma"));
    assert!(err("hidden = []").contains("hidden"));
    assert!(err("rollout_schedule = [10, 5, 1, 1]").contains("rollout_schedule"));
    assert!(err("min_pool_size = 10\nreplay_size = 5").contains("min_pool_size"));
    assert!(err("typo_key = 3").contains("typo_key"));
    assert!(err("variant = \"dppo\"").contains("variant"));
    let e = AgentConfig::from_toml_str("task = \"cartpole\"").unwrap_err().to_string();
    assert!(e.contains("cartpole"), "{e}");
    let e = AgentConfig::from_file(std::path::Path::new("no/such/file.toml")).unwrap_err().to_string();
    assert!(e.contains("no/such/file.toml"), "{e}");
    assert!(!e.contains('\n'));
}

#[test]
fn variants_by_name() {
    for v in Variant::ALL {
        assert_eq!(Variant::from_name(v.name()).unwrap(), v);
        let c = AgentConfig::from_toml_str(&format!("task = \"pendulum\"\nvariant = \"{}\"", v.name())).unwrap();
        assert_eq!(c.variant, v);
    }
    assert!(Variant::from_name("ppo").unwrap_err().to_string().contains("no-grad-loss"));
}

/// Every numeric key is bounded to what the code can run: the edge value
/// passes, one step beyond it is refused naming the key, and nothing
/// overflows on the way (issue 14, item 5).
#[test]
fn numeric_keys_are_bounded_to_what_runs() {
    // (TOML accepted at the edge, TOML just beyond it, the key the error names)
    let cases: &[(&str, &str, &str)] = &[
        ("eval_episodes = 10000", "eval_episodes = 0", "eval_episodes"),
        ("eval_episodes = 1", "eval_episodes = 10001", "eval_episodes"),
        ("eval_workers = 256", "eval_workers = 257", "eval_workers"),
        ("epochs = 1000\nepoch_length = 1000000", "epochs = 1001\nepoch_length = 1000000", "epochs x epoch_length"),
        ("epochs = 1", "epochs = 9223372036854775807", "epochs"),
        ("epoch_length = 1000", "epoch_length = 9223372036854775807", "epoch_length"),
        ("start_steps = 0", "start_steps = 1000000001", "start_steps"),
        ("checkpoint_every = 0", "checkpoint_every = 1000000001", "checkpoint_every"),
        ("replay_size = 1000000000", "replay_size = 1000000001", "replay_size"),
        ("variant = \"sac\"\nmodel_train_freq = 1000000000", "model_train_freq = 0", "model_train_freq"),
        // 100000 x 1000 / 10^8 = 1 row of D_model per epoch; 0 rows cannot run.
        ("model_train_freq = 100000000", "model_train_freq = 100000001", "D_model"),
        ("horizon = 100", "horizon = 101", "horizon"),
        ("batch_size = 65536", "batch_size = 65537", "batch_size"),
        ("policy_updates_per_step = 1000", "policy_updates_per_step = 1001", "policy_updates_per_step"),
        ("critic_updates_per_step = 0", "critic_updates_per_step = 1001", "critic_updates_per_step"),
        ("max_train_repeat_per_step = 1000", "max_train_repeat_per_step = 1001", "max_train_repeat_per_step"),
        ("hidden = [16384]", "hidden = [16385]", "hidden"),
        (
            "hidden = [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]",
            "hidden = [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]",
            "hidden",
        ),
        ("rollout_schedule = [1, 15, 1, 1000]", "rollout_schedule = [1, 15, 1, 1001]", "rollout_schedule"),
        ("double_params_hidden = 16384", "double_params_hidden = 0", "double_params_hidden"),
        // D_model: 1 x rollout_batch_size x 1000 / 250 x k rows, at most 10^9.
        ("rollout_batch_size = 250000000", "rollout_batch_size = 250000001", "D_model"),
        (
            "rollout_batch_size = 25000000\nrollout_schedule = [1, 15, 1, 10]",
            "rollout_batch_size = 25000001\nrollout_schedule = [1, 15, 1, 10]",
            "D_model",
        ),
        (
            "retain_epochs = 250\nrollout_batch_size = 1000000",
            "retain_epochs = 251\nrollout_batch_size = 1000000",
            "D_model",
        ),
        (
            "retain_epochs = 1000000000\nrollout_batch_size = 1\nmodel_train_freq = 1000",
            "retain_epochs = 9223372036854775807",
            "retain_epochs",
        ),
        // The first model training sees min_pool_size rows: n below that...
        (
            "min_pool_size = 11\nstart_steps = 11\n[gradient]\nneighbours = 10",
            "min_pool_size = 10\n[gradient]\nneighbours = 10",
            "gradient.neighbours",
        ),
        ("[gradient]\nneighbours = 500", "[gradient]\nneighbours = 500\nneighbour_set = 500", "neighbour_set"),
        ("[gradient]\nneighbours = 1000", "[gradient]\nneighbours = 1001", "neighbours"),
        // ... and one row left for training beside the holdout.
        (
            "min_pool_size = 2\n[gradient]\nneighbours = 1",
            "min_pool_size = 1\n[gradient]\nneighbours = 1",
            "min_pool_size",
        ),
        (
            "min_pool_size = 5\n[model]\nholdout_ratio = 0.8\n[gradient]\nneighbours = 1",
            "min_pool_size = 5\n[model]\nholdout_ratio = 0.9\n[gradient]\nneighbours = 1",
            "min_pool_size",
        ),
        ("[model]\nensemble_size = 100", "[model]\nensemble_size = 101", "ensemble_size"),
        ("[model]\nhidden = 16384", "[model]\nhidden = 16385", "hidden"),
        (
            "[model]\nhidden_layers = 1\nweight_decay = [0.0, 0.0]",
            "[model]\nhidden_layers = 0\nweight_decay = [0.0]",
            "hidden_layers",
        ),
        ("[model]\nbatch_size = 65536", "[model]\nbatch_size = 65537", "batch_size"),
        ("[model]\nmax_epochs = 1", "[model]\nmax_epochs = 0", "max_epochs"),
        ("[model]\nwarm_max_epochs = 1", "[model]\nwarm_max_epochs = 0", "warm_max_epochs"),
        (
            "[gradient]\nneighbours = 5\ndirections_per_step = 5",
            "[gradient]\nneighbours = 5\ndirections_per_step = 6",
            "directions_per_step",
        ),
    ];
    for (ok, bad, key) in cases {
        let base = "task = \"pendulum\"\n";
        if let Err(e) = AgentConfig::from_toml_str(&format!("{base}{ok}")) {
            panic!("edge value refused: {ok:?}: {e}");
        }
        let e = err(bad);
        assert!(e.contains(key), "{bad:?}: expected `{key}` in: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
    // TOML cannot hold a larger seed (the resolved config is written as TOML).
    let mut c = AgentConfig::from_toml_str("task = \"pendulum\"\nseed = 9223372036854775807").unwrap();
    c.seed = u64::MAX;
    assert!(c.validate().unwrap_err().to_string().contains("seed"));
    // The model keys only bind variants with a model; the gradient keys only
    // those with the gradient loss.
    let sac = "variant = \"sac\"\n[gradient]\nneighbours = 6000";
    assert!(AgentConfig::from_toml_str(&format!("task = \"pendulum\"\n{sac}")).is_ok());
    assert!(err("variant = \"no-grad-loss\"\nmin_pool_size = 1").contains("min_pool_size"));
}

/// Every task's preset: valid (`preset` itself does not validate: the run
/// validates its resolved config once), documenting the bounds.
#[test]
fn every_preset_is_valid_and_documents_the_bounds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let tasks = ["inverted-pendulum", "hopper", "walker2d", "half-cheetah", "ant", "humanoid", "pendulum"];
    for task in tasks {
        let c = AgentConfig::preset(task).unwrap();
        c.validate().unwrap_or_else(|e| panic!("configs/{task}.toml: {e}"));
        let text = std::fs::read_to_string(dir.join(format!("{task}.toml"))).unwrap();
        for needle in ["1..=10000", "<= 10^9", "below min_pool_size", "1..=100]"] {
            assert!(text.contains(needle), "configs/{task}.toml does not document `{needle}`");
        }
    }
    // Every preset file of the folder is in that list (linear.toml is the
    // linear env's system, not a preset).
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().trim_end_matches(".toml").to_string())
        .filter(|n| n != "linear")
        .collect();
    files.sort();
    let mut listed = tasks.map(String::from).to_vec();
    listed.sort();
    assert_eq!(files, listed);
    // The top-level `configs` is the same folder (a link), where users find it.
    let top = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    assert_eq!(std::fs::canonicalize(top).unwrap(), std::fs::canonicalize(&dir).unwrap());
}

#[test]
fn overrides_change_the_typed_config_and_resolve_validates_once() {
    let base = AgentConfig::preset("hopper").unwrap();
    let overrides = Overrides {
        task: Some("walker2d".into()),
        variant: Some(Variant::Sac),
        seed: Some(3),
        // Applied after the three above: the last word is the `--set`'s.
        sets: vec!["model.lr=0.01".into(), "hidden=[64, 32]".into(), "seed=4".into(), "target_entropy=-2.5".into()],
    };
    let resolved = base.clone().resolve(&overrides).unwrap();
    let mut expect = base.clone();
    expect.task = "walker2d".into();
    expect.variant = Variant::Sac;
    expect.seed = 4;
    expect.model.lr = 0.01;
    expect.hidden = vec![64, 32];
    expect.target_entropy = Some(-2.5);
    assert_eq!(*resolved, expect);
    assert_eq!(resolved.into_inner(), expect);

    // A bare word is a string; a quoted one too.
    let mut c = base.clone();
    c.set("variant=mbpo").unwrap();
    assert_eq!(c.variant, Variant::Mbpo);
    c.set("task=\"ant\"").unwrap();
    assert_eq!(c.task, "ant");
    c.set("task=\"none\"").unwrap();
    assert_eq!(c.task, "none");

    // The bare word `none` unsets an optional key (again: no change), and
    // only that key.
    let mut c = base.clone();
    c.set("model.warm_max_epochs=5").unwrap();
    c.set("target_entropy=-1.5").unwrap();
    assert_eq!((c.model.warm_max_epochs, c.target_entropy), (Some(5), Some(-1.5)));
    c.set("model.warm_max_epochs=none").unwrap();
    assert_eq!((c.model.warm_max_epochs, c.target_entropy), (None, Some(-1.5)));
    c.set("target_entropy = none").unwrap();
    let mut expect = base.clone();
    expect.model.warm_max_epochs = None;
    expect.target_entropy = None;
    assert_eq!(c, expect);
    c.set("model.warm_max_epochs=none").unwrap();
    assert_eq!(c, expect);

    // Bad assignments name the key and leave the config as it was.
    let cases = [
        ("no_such_key=1", "unknown field `no_such_key`"),
        ("model.no_such_key=1", "unknown field `no_such_key`"),
        ("epochs=\"many\"", "--set epochs=\"many\": invalid type: string \"many\""),
        ("epochs", "--set epochs: expected KEY=VALUE"),
        ("=1", "--set =1: empty key"),
        ("epochs.x=1", "--set epochs.x=1: `epochs` is not a table"),
        ("epochs=none", "--set epochs=none: `epochs` is not optional; give it a value"),
        ("model.lr=none", "`model.lr` is not optional"),
        ("model.no_such_key=none", "--set model.no_such_key=none: unknown field `no_such_key`"),
        ("no_such_table.key=none", "unknown field `no_such_table`"),
        ("epochs.x=none", "`epochs` is not a table"),
    ];
    for (assignment, expect) in cases {
        let mut c = base.clone();
        let e = c.set(assignment).unwrap_err().to_string();
        assert!(e.contains(expect), "{assignment}: expected `{expect}` in: {e}");
        assert!(!e.contains('\n'), "{assignment}: {e}");
        assert_eq!(c, base, "{assignment} changed the config");
    }

    // `set` takes any value of the right type; `resolve` refuses a bad one.
    let mut c = base.clone();
    c.set("critic_lr=-0.1").unwrap();
    assert_eq!(c.critic_lr, -0.1);
    let bad = Overrides { sets: vec!["critic_lr=-0.1".into()], ..Overrides::default() };
    let e = base.clone().resolve(&bad).unwrap_err().to_string();
    assert!(e.contains("critic_lr must be positive"), "{e}");
    // An invalid base is caught by the same one validation.
    let mut broken = base;
    broken.horizon = 0;
    let e = broken.resolve(&Overrides::default()).unwrap_err().to_string();
    assert!(e.contains("horizon"), "{e}");
}
