//! The presets hold Table 1's values; bad configs fail with a clear error.

#![allow(clippy::type_complexity, clippy::field_reassign_with_default)]

use ddppo_agent::{AgentConfig, RolloutSchedule, Variant};

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
        assert_eq!((c.epoch_length, c.model.ensemble_size, c.policy_updates_per_step, c.critic_updates_per_step), (1000, 7, 10, 10));
        assert_eq!(c.variant, Variant::Ddppo);
        // The file on disk is the compiled-in one.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs").join(format!("{task}.toml"));
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
