//! `benches/format1.py`, the measuring tool that writes a checkpoint of this
//! code in 865bef1's layout (ddppo-checkpoint/1) for side-by-side timings:
//! every network, optimiser moment and step count, buffer, random stream and
//! counter of the source checkpoint arrives under 865bef1's names, the
//! manifest's checksums hold, and a config with a setting 865bef1 does not
//! have is refused with nothing written. (That 865bef1 itself continues the
//! result as this code does is checked where 865bef1 is built: the README's
//! 20,000-transition measurement; this test keeps the tool in step with the
//! current format.)

mod common;

use candle_core::{DType, Device, Tensor};
use common::{s, tiny_run};
use ddppo_buffer::Fnv1a;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benches/format1.py")
}

fn format1(args: &[&str]) -> Output {
    Command::new("python3").arg(script()).args(args).output().expect("python3 (3.11 or newer) runs benches/format1.py")
}

fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}");
    out
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tensor's dtype, shape and values (every dtype here converts to f64 exactly).
fn values(t: &Tensor) -> (DType, Vec<usize>, Vec<f64>) {
    (t.dtype(), t.dims().to_vec(), t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap())
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A test's directory, and the tiny config with 865bef1's early stopping
/// and no Jacobian diagnostics trained to its end in it: the run and its
/// checkpoint at 450 (600 is the other).
fn source_run(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let tmp = common::tempdir("format1", name);
    let run = tiny_run(&tmp, "run", &["jacobian_states=0", "model.cold_start_wait=0"]);
    let src = run.join("checkpoints").join("step-0000000450");
    (tmp, run, src)
}

#[test]
fn a_checkpoint_arrives_whole_in_865bef1s_layout() {
    let (tmp, run, src) = source_run("whole");
    let out = tmp.join("old");
    let said = ok(&format1(&[s(&src), s(&out), "--epochs", "2"]));
    assert!(said.contains("step 450 of 1200"), "{said}");
    let ck = out.join("checkpoints").join("step-0000000450");

    // The manifest: 865bef1's file set, each file's size and checksum.
    let manifest = json(&ck.join("MANIFEST.json"));
    assert_eq!(manifest["format"], "ddppo-checkpoint/1");
    assert_eq!(manifest["env_steps"], 450);
    let files = manifest["files"].as_object().unwrap();
    let mut names: Vec<&str> = files.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "env_buffer.bin",
            "gradient.safetensors",
            "model_buffer.bin",
            "networks.safetensors",
            "prediction.safetensors",
            "state.json"
        ]
    );
    for (name, sum) in files {
        let bytes = std::fs::read(ck.join(name)).unwrap();
        let mut h = Fnv1a::new();
        h.update(&bytes);
        assert_eq!(sum["bytes"], bytes.len(), "{name}");
        assert_eq!(sum["fnv1a64"], format!("{:016x}", h.value()), "{name}");
    }
    for b in ["env_buffer.bin", "model_buffer.bin"] {
        assert_eq!(std::fs::read(ck.join(b)).unwrap(), std::fs::read(src.join(b)).unwrap(), "{b}");
    }

    // Every tensor of the parameter tree, under 865bef1's names.
    let tree = load(&src.join("networks.safetensors"));
    let networks = load(&ck.join("networks.safetensors"));
    let ensembles = [
        ("prediction", load(&ck.join("prediction.safetensors"))),
        ("gradient", load(&ck.join("gradient.safetensors"))),
    ];
    let state = json(&ck.join("state.json"));
    let mut seen = 0;
    for (name, t) in &tree {
        let (head, rest) = name.split_once('/').unwrap();
        if let Some((_, e)) = ensembles.iter().find(|(n, _)| *n == head) {
            assert_eq!(values(&e[rest]), values(t), "{name}");
        } else if let Some(opt) = name.strip_prefix("opt/").and_then(|r| r.strip_suffix("/step")) {
            let step = t.to_vec1::<i64>().unwrap()[0];
            assert!(step > 0, "{name}");
            assert_eq!(state["optimizer_steps"][opt], step, "{name}");
        } else {
            assert_eq!(values(&networks[name]), values(t), "{name}");
        }
        seen += 1;
    }
    let steps = state["optimizer_steps"].as_object().unwrap().len();
    assert_eq!(seen, networks.len() + ensembles.iter().map(|(_, e)| e.len() - 1).sum::<usize>() + steps);
    assert_eq!(steps, 5, "policy, critic, alpha and the two ensembles' Adam steps");
    for (name, e) in &ensembles {
        let meta: Value = serde_json::from_slice(&e["meta.json"].to_vec1::<u8>().unwrap()).unwrap();
        assert_eq!(meta["format"], "ddppo-ensemble-v1", "{name}");
        // The pendulum: two state values in, one torque.
        assert_eq!((meta["obs_dim"].as_u64(), meta["act_dim"].as_u64()), (Some(2), Some(1)), "{name}");
        assert_eq!(e["scaler.mean"].dims(), [3], "{name}");
        let c = &meta["config"];
        assert_eq!(
            (&c["ensemble_size"], &c["elites"], &c["hidden"], &c["hidden_layers"]),
            (&3.into(), &2.into(), &16.into(), &2.into())
        );
        assert_eq!(c["max_epochs"], 3, "{name}");
    }

    // The run state: counters, observation, random streams, losses.
    let new = json(&src.join("state.json"));
    let r = &new["run"];
    for k in [
        "env_steps",
        "critic_updates",
        "policy_updates",
        "model_trainings",
        "rollout_length",
        "obs",
        "episode_return",
        "last_train_return",
        "rngs",
    ] {
        assert_eq!(state[k], r[k], "{k}");
    }
    assert_eq!(state["env_state"], new["env_state"]);
    assert_eq!(state["critic_loss"], serde_json::json!([r["critic_loss"]["sum"], r["critic_loss"]["n"]]));
    assert_eq!(state["model_holdout_mse"], r["model_stats"]["holdout"]);
    assert_eq!(state["grad_loss"], r["model_stats"]["grad"]);
    assert_eq!(state["rngs"].as_object().unwrap().len(), 4);

    // The config in 865bef1's keys, with the new end, also as the run's config.toml.
    let config = state["config"].as_str().unwrap();
    assert_eq!(std::fs::read_to_string(out.join("config.toml")).unwrap(), config);
    let parsed: toml::Table = config.parse().unwrap();
    let saved: toml::Table = new["config"].as_str().unwrap().parse().unwrap();
    assert_eq!(parsed["epochs"].as_integer(), Some(2));
    for k in ["jacobian_states", "jacobian_directions"] {
        assert!(saved.contains_key(k) && !parsed.contains_key(k), "{k}");
    }
    assert!(!parsed["model"].as_table().unwrap().contains_key("cold_start_wait"));
    for (k, v) in &saved {
        if !["epochs", "jacobian_states", "jacobian_directions", "model"].contains(&k.as_str()) {
            assert_eq!(&parsed[k], v, "{k}");
        }
    }

    // The metrics up to the checkpoint, as the source run wrote them.
    let lines = |p: &Path| std::fs::read_to_string(p).unwrap().lines().map(String::from).collect::<Vec<_>>();
    let source = lines(&run.join("metrics.jsonl"));
    assert_eq!(lines(&out.join("metrics.jsonl")), source[..4], "steps 0, 150, 300, 450");

    // `--compare` of the result with itself: no differences; with another
    // step's checkpoint: the differences named, exit 1.
    let same = format1(&[s(&src), "--compare", s(&ck)]);
    assert!(ok(&same).contains("0 differences"));
    let later = run.join("checkpoints").join("step-0000000600");
    ok(&format1(&[s(&later), s(&tmp.join("old600")), "--epochs", "2", "--checkpoint-every", "50"]));
    let other = tmp.join("old600").join("checkpoints").join("step-0000000600");
    // `--checkpoint-every` sets that key and nothing else (in both copies).
    let state600 = json(&other.join("state.json"));
    let text600 = state600["config"].as_str().unwrap();
    assert_eq!(std::fs::read_to_string(tmp.join("old600").join("config.toml")).unwrap(), text600);
    let mut parsed600: toml::Table = text600.parse().unwrap();
    assert_eq!(parsed600.insert("checkpoint_every".into(), parsed["checkpoint_every"].clone()), Some(50.into()));
    assert_ne!(parsed["checkpoint_every"].as_integer(), Some(50));
    assert_eq!(parsed600, parsed);
    let differ = format1(&[s(&src), "--compare", s(&other)]);
    let said = String::from_utf8_lossy(&differ.stdout);
    assert_eq!(differ.status.code(), Some(1), "{said}");
    assert!(said.contains("`env_steps`") && said.contains("networks.safetensors"), "{said}");
}

#[test]
fn a_setting_865bef1_lacks_is_refused_and_nothing_is_written() {
    let (tmp, run, src) = source_run("refused");
    // The same checkpoint with Jacobian diagnostics in its config.
    let edited = tmp.join("edited");
    std::fs::create_dir(&edited).unwrap();
    for f in std::fs::read_dir(&src).unwrap().flatten() {
        std::fs::copy(f.path(), edited.join(f.file_name())).unwrap();
    }
    let text = std::fs::read_to_string(edited.join("state.json")).unwrap();
    let changed = text.replace("jacobian_states = 0\\n", "jacobian_states = 16\\n");
    assert_ne!(changed, text);
    std::fs::write(edited.join("state.json"), changed).unwrap();

    for (args, expect) in [
        (vec![s(&edited), s(&tmp.join("a")), "--epochs", "2"], "`jacobian_states = 16`: 865bef1 has only `0`"),
        (vec![s(&src), s(&tmp.join("b")), "--epochs", "0"], "not after the checkpoint's step 450"),
        (vec![s(&run), s(&tmp.join("c")), "--epochs", "2"], "MANIFEST.json"),
        (vec![s(&src), s(&tmp.join("e")), "--epochs", "2", "--checkpoint-every", "-5"], "--checkpoint-every -5"),
    ] {
        let o = format1(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(expect) && err.trim().lines().count() == 1 && !err.contains("Traceback"), "{err}");
        assert!(!Path::new(args[1]).exists(), "{} was written", args[1]);
    }
    // A speed option: refused, or dropped with `--paper`.
    let text = std::fs::read_to_string(src.join("state.json")).unwrap();
    let with_option = text.replace("neighbours = 3\\n", "neighbours = 3\\ndirections_per_step = 1\\n");
    assert_ne!(with_option, text);
    std::fs::write(edited.join("state.json"), with_option).unwrap();
    let o = format1(&[s(&edited), s(&tmp.join("d")), "--epochs", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("`gradient.directions_per_step = 1`") && err.contains("--paper"), "{err}");
    assert!(!tmp.join("d").exists());
    ok(&format1(&[s(&edited), s(&tmp.join("d")), "--epochs", "2", "--paper"]));
    let config: toml::Table = std::fs::read_to_string(tmp.join("d").join("config.toml")).unwrap().parse().unwrap();
    assert_eq!(config["gradient"].as_table().unwrap().get("directions_per_step"), None);
    assert_eq!(config["gradient"]["neighbours"].as_integer(), Some(3));

    // An existing directory is not written into.
    let o = format1(&[s(&src), s(&run), "--epochs", "2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists"));
}
