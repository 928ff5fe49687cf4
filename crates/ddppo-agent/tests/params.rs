//! The parameter tree holds every network and optimiser state: loaded into an
//! agent of another seed it makes that agent's tree equal, tensor for
//! tensor; a tensor missing, of the wrong shape, or belonging to nothing is
//! an error naming it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use ddppo_agent::{Agent, AgentConfig, ParamTree, Variant};

fn agent(seed: u64) -> Agent {
    let mut c = AgentConfig::preset("pendulum").expect("preset");
    c.variant = Variant::Ddppo;
    c.seed = seed;
    c.hidden = vec![8, 8];
    c.batch_size = 8;
    c.start_steps = 40;
    c.min_pool_size = 40;
    c.model_train_freq = 40;
    c.rollout_batch_size = 20;
    c.policy_updates_per_step = 1;
    c.critic_updates_per_step = 1;
    c.model.ensemble_size = 3;
    c.model.elites = 2;
    c.model.hidden = 8;
    c.model.hidden_layers = 2;
    c.model.max_epochs = Some(2);
    c.model.weight_decay = vec![1e-4; 3];
    c.gradient.neighbours = 3;
    c.jacobian_states = 0;
    let mut a = Agent::new(c).expect("agent");
    // Past the first model training, so the ensembles' optimisers have a state.
    while a.env_steps() < 42 {
        a.step().expect("step");
    }
    a
}

fn values(tree: &ParamTree) -> Vec<(String, Vec<f64>)> {
    tree.names()
        .map(|n| {
            let t = tree.get(n).expect("tensor");
            let v = t.flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1::<f64>().unwrap();
            (n.to_string(), v)
        })
        .collect()
}

/// The tree of `file`, changed by `edit`, written back and read again.
fn edited(file: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> ParamTree {
    let mut map = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    edit(&mut map);
    let out = file.with_extension("edited.safetensors");
    candle_core::safetensors::save(&map, &out).unwrap();
    ParamTree::load(&out, &Device::Cpu).unwrap()
}

#[test]
fn a_tree_moves_every_network_and_optimiser_and_refuses_what_does_not_fit() {
    let a = agent(1);
    let tree = a.params().expect("params");
    let names: Vec<&str> = tree.names().collect();
    for prefix in ["policy/", "critic/", "critic_target/", "temperature/", "opt/policy/", "opt/critic/", "opt/alpha/"] {
        assert!(names.iter().any(|n| n.starts_with(prefix)), "no {prefix} in {names:?}");
    }
    for name in ["opt/prediction/step", "opt/gradient/step", "opt/policy/step"] {
        assert!(names.contains(&name), "no {name}");
    }

    let dir = std::env::temp_dir().join(format!("ddppo-params-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tree.safetensors");
    tree.save(&file).expect("save");

    let mut b = agent(2);
    let before = values(&b.params().unwrap());
    assert_ne!(before, values(&tree), "two seeds, one set of weights");
    b.load_params(&ParamTree::load(&file, &Device::Cpu).unwrap()).expect("load");
    assert_eq!(values(&b.params().unwrap()), values(&tree));

    let mut c = agent(2);
    let err = |tree: ParamTree, c: &mut Agent| c.load_params(&tree).expect_err("refused").to_string();
    let e = err(edited(&file, |m| drop(m.remove("opt/critic/v/0"))), &mut c);
    assert!(e.contains("no tensor `opt/critic/v/0`"), "{e}");
    let extra = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = err(edited(&file, |m| drop(m.insert("policy/extra".into(), extra))), &mut c);
    assert!(e.contains("`policy/extra` belongs to no network"), "{e}");
    let e = err(
        edited(&file, |m| {
            let bad = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap();
            m.insert("temperature/log_alpha".into(), bad);
        }),
        &mut c,
    );
    assert!(e.contains("temperature/log_alpha") && e.contains("shape"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
