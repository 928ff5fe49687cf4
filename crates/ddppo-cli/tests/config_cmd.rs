//! `ddppo config` prints the config `ddppo train` resolves (and writes) for
//! the same arguments; `ddppo checkpoint latest` names a run's newest
//! checkpoint. Scripts (xtask) ask these instead of copying the knowledge.

mod common;

use common::{TINY, ddppo, s};
use ddppo_agent::{AgentConfig, Variant};

#[test]
fn config_prints_what_train_writes() {
    let tmp = common::tempdir("config", "same");
    let file = tmp.join("tiny.toml");
    // A tiny model-free run: seconds, and still a complete run directory.
    std::fs::write(&file, TINY).unwrap();
    let args = [
        "--config",
        s(&file),
        "--variant",
        "sac",
        "--seed",
        "5",
        "--set",
        "epoch_length=300",
        "--set",
        "eval_every=300",
    ];
    let printed = ddppo(&[&["config"][..], &args].concat());
    assert!(printed.status.success(), "{}", String::from_utf8_lossy(&printed.stderr));
    let run = tmp.join("run");
    let trained = ddppo(&[&["train"][..], &args, &["--out", s(&run)]].concat());
    assert!(trained.status.success(), "{}", String::from_utf8_lossy(&trained.stderr));
    assert_eq!(
        String::from_utf8(printed.stdout.clone()).unwrap(),
        std::fs::read_to_string(run.join("config.toml")).unwrap()
    );
    // Independently: the file, then the flags, then the `--set`s.
    let mut expect = AgentConfig::from_toml_str(TINY).unwrap();
    expect.variant = Variant::Sac;
    expect.seed = 5;
    expect.epoch_length = 300;
    expect.eval_every = 300;
    assert_eq!(AgentConfig::from_toml_str(&String::from_utf8_lossy(&printed.stdout)).unwrap(), expect);

    // The newest of the run's two checkpoints (every 150 steps).
    assert_eq!(std::fs::read_dir(run.join("checkpoints")).unwrap().count(), 2);
    let latest = ddppo(&["checkpoint", "latest", s(&run)]);
    assert!(latest.status.success(), "{}", String::from_utf8_lossy(&latest.stderr));
    let path = String::from_utf8(latest.stdout).unwrap();
    let path = std::path::Path::new(path.trim_end());
    assert!(path.is_dir(), "{}", path.display());
    assert!(path.ends_with("checkpoints/step-0000000300"), "{}", path.display());
}

#[test]
fn config_from_a_preset_and_its_errors() {
    let o = ddppo(&["config", "--env", "hopper", "--set", "model.lr=0.01"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut expect = AgentConfig::preset("hopper").unwrap();
    expect.model.lr = 0.01;
    assert_eq!(AgentConfig::from_toml_str(&String::from_utf8_lossy(&o.stdout)).unwrap(), expect);
    for (args, needle) in [
        (&["config", "--env", "hopper", "--set", "horizon=0"][..], "horizon"),
        (&["config", "--env", "hopper", "--set", "no_such_key=1"], "unknown field `no_such_key`"),
        (&["config", "--env", "cartpole"], "unknown env `cartpole`"),
        (&["checkpoint", "latest", "no/such/run"], "is not a directory"),
    ] {
        let o = ddppo(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}");
    }
    let empty = common::tempdir("config", "empty");
    let o = ddppo(&["checkpoint", "latest", s(&empty)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("has no complete checkpoint"));
    // Neither --env nor --config: a usage error.
    assert_eq!(ddppo(&["config"]).status.code(), Some(2));
}
