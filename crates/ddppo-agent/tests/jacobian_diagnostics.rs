//! The live Jacobian-error diagnostics: logged for every model variant, empty
//! for `sac`, and without any effect on the training (a run with them on and
//! one with them off produce the same returns and losses, bit for bit).

mod common;

use ddppo_agent::jacobian_error::JacobianProbe;
use ddppo_agent::{Agent, AgentConfig, EvalRecord, NoObserver, Variant};
use ddppo_env::{EnvFactory, Task};

fn tiny(variant: Variant, jacobian_states: usize) -> AgentConfig {
    common::tiny(variant, 3, jacobian_states)
}

fn run(cfg: AgentConfig) -> (Agent, Vec<EvalRecord>) {
    common::one_thread();
    let mut agent = Agent::new(cfg).expect("agent");
    let records = agent.train(None, &mut NoObserver).expect("training");
    (agent, records)
}

const FIGURES: [&str; 6] = [
    "pred_jacobian_mse_reward",
    "pred_jacobian_mse_dynamics",
    "pred_jacobian_cos",
    "grad_jacobian_mse_reward",
    "grad_jacobian_mse_dynamics",
    "grad_jacobian_cos",
];

/// The record as JSON without the wall-clock fields and the diagnostics.
fn training_part(r: &EvalRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(r).expect("json");
    let o = v.as_object_mut().expect("object");
    // The reward row's action-column figures belong to the diagnostics too.
    let action = [
        "pred_jacobian_mse_reward_action",
        "pred_jacobian_cos_reward_action",
        "grad_jacobian_mse_reward_action",
        "grad_jacobian_cos_reward_action",
    ];
    for k in ["wall_s", "phase_s"].into_iter().chain(FIGURES).chain(action) {
        o.remove(k);
    }
    v
}

fn figures(r: &EvalRecord) -> [Option<f64>; 6] {
    [
        r.pred_jacobian_mse_reward,
        r.pred_jacobian_mse_dynamics,
        r.pred_jacobian_cos,
        r.grad_jacobian_mse_reward,
        r.grad_jacobian_mse_dynamics,
        r.grad_jacobian_cos,
    ]
}

#[test]
fn diagnostics_on_and_off_train_identically() {
    let (agent, on) = run(tiny(Variant::Ddppo, 32));
    let (_, off) = run(tiny(Variant::Ddppo, 0));
    assert_eq!(on.len(), 4);
    assert_eq!(on.iter().map(training_part).collect::<Vec<_>>(), off.iter().map(training_part).collect::<Vec<_>>());
    // Before the first model training (the evaluation at step 0) nothing is
    // measured; afterwards every figure is there, and the two ensembles differ.
    assert!(figures(&on[0]).iter().all(Option::is_none));
    for r in &on[1..] {
        let f = figures(r).map(|x| x.expect("a figure after model training"));
        assert!(f.iter().all(|x| x.is_finite()), "{f:?}");
        assert!(f[0] >= 0.0 && f[1] >= 0.0 && (-1.0..=1.0).contains(&f[2]), "{f:?}");
        assert_ne!(f[..3], f[3..], "ddppo has two ensembles");
    }
    assert!(off.iter().all(|r| figures(r).iter().all(Option::is_none)));
    // The logged figures are those of a probe drawn again from the seed.
    let cfg = agent.config();
    let probe = JacobianProbe::draw(Task::Pendulum, &EnvFactory::new(Task::Pendulum).unwrap(), 32, 8, cfg.seed, 1)
        .expect("probe");
    let models = agent.models.as_ref().expect("models");
    let pred = probe.errors(models.prediction.ensemble()).expect("errors");
    let grad = probe.errors(models.gradient.as_ref().expect("gradient").ensemble()).expect("errors");
    let last = on.last().expect("records");
    assert_eq!(
        figures(last),
        [pred.mse_reward, pred.mse_dynamics, pred.cos, grad.mse_reward, grad.mse_dynamics, grad.cos].map(Some)
    );
}

#[test]
fn one_ensemble_variants_log_it_twice_and_sac_logs_nothing() {
    let (_, ngl) = run(tiny(Variant::NoGradLoss, 16));
    let last = figures(ngl.last().expect("records"));
    assert!(last[0].is_some());
    assert_eq!(last[..3], last[3..]);
    let (_, sac) = run(tiny(Variant::Sac, 16));
    assert!(sac.iter().all(|r| figures(r).iter().all(Option::is_none)));
}

#[test]
fn the_probe_survives_a_checkpoint() {
    let (mut agent, _) = run(tiny(Variant::NoGradLoss, 16));
    let dir = std::env::temp_dir().join(format!("ddppo-jac-probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    agent.save_checkpoint(&dir).expect("save");
    let manifest = std::fs::read_to_string(dir.join("MANIFEST.json")).unwrap();
    assert!(manifest.contains("jacobian_probe.safetensors"), "{manifest}");
    let mut resumed = Agent::from_checkpoint(agent.config().clone(), candle_core::Device::Cpu, &dir).expect("load");
    let before = figures(&agent.evaluate().expect("eval"));
    assert!(before[0].is_some());
    assert_eq!(before, figures(&resumed.evaluate().expect("eval")));
    // A damaged probe file is refused by name.
    let probe = dir.join("jacobian_probe.safetensors");
    let mut bytes = std::fs::read(&probe).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&probe, bytes).unwrap();
    let err = Agent::from_checkpoint(agent.config().clone(), candle_core::Device::Cpu, &dir).err().expect("refused");
    assert!(err.to_string().contains("jacobian_probe.safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
