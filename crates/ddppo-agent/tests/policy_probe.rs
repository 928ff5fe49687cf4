//! The policy diagnostics logged at every evaluation (`policy_probe`): they
//! change nothing the training uses, and their true action cost is the
//! task's own (Pendulum: `r(s, 0) - r(s, a) = 0.001 a^2`, the torque cost).

mod common;

use common::one_thread;
use ddppo_agent::{Agent, AgentConfig, EvalRecord, Variant};
use ddppo_env::{AnalyticDynamics, Pendulum};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn tiny(variant: Variant) -> AgentConfig {
    common::tiny(variant, 4, 0)
}

/// Evaluations of a whole run; with `extra`, the probe also runs after every step.
fn run(cfg: AgentConfig, extra: bool) -> Vec<EvalRecord> {
    one_thread();
    let mut agent = Agent::new(cfg).expect("agent");
    let mut records = vec![agent.evaluate().expect("evaluation")];
    while !agent.finished() {
        records.extend(agent.step().expect("step"));
        if extra {
            agent.policy_probe().expect("probe");
        }
    }
    records
        .into_iter()
        .map(|mut r| {
            r.wall_s = 0.0;
            r.phase_s = Default::default();
            r
        })
        .collect()
}

#[test]
fn probing_after_every_step_changes_no_evaluation() {
    for variant in [Variant::Ddppo, Variant::Mbpo] {
        let plain = run(tiny(variant), false);
        let probed = run(tiny(variant), true);
        assert_eq!(plain.len(), 4);
        assert_eq!(plain, probed, "{variant:?}");
        // Logged: at step 0 the buffer is empty, afterwards every figure that
        // applies (the reward part only for the back-propagated update).
        let first = &plain[0];
        assert!(first.policy_grad_q.is_none() && first.action_cost_true.is_none());
        assert!(first.eval_action_abs.is_some_and(|a| (0.0..=2.0).contains(&a)));
        let last = plain.last().expect("records");
        assert!(last.policy_grad_q.is_some_and(|g| g.is_finite() && g > 0.0), "{last:?}");
        assert!(last.policy_grad_entropy.is_some_and(|g| g.is_finite() && g > 0.0), "{last:?}");
        assert_eq!(last.policy_grad_reward.is_some(), variant == Variant::Ddppo, "{last:?}");
        assert!(last.critic_q.is_some_and(f64::is_finite) && last.policy_return.is_some_and(f64::is_finite));
        for x in [last.action_cost_true, last.action_cost_pred, last.action_cost_grad, last.reward_error_pred] {
            assert!(x.is_some_and(f64::is_finite), "{last:?}");
        }
        // Before the first model training the back-propagated update has no
        // model to differentiate: no gradient figures (the SAC update has them).
        let mut early = Agent::new(tiny(variant)).expect("agent");
        for _ in 0..10 {
            early.step().expect("step");
        }
        let p = early.policy_probe().expect("probe").expect("D_env holds rows");
        assert_eq!(p.grad_norm_q.is_some(), variant == Variant::Mbpo, "{p:?}");
        assert_eq!(p.grad_norm_entropy.is_some(), variant == Variant::Mbpo, "{p:?}");
        assert!(p.action_cost_true.is_none() && p.critic_q.is_none(), "{p:?}");
        if variant == Variant::Mbpo {
            // One ensemble: the differentiating one is the rollout one.
            assert_eq!(last.action_cost_pred, last.action_cost_grad);
            assert_eq!(last.reward_error_pred, last.reward_error_grad);
        } else {
            assert_ne!(last.action_cost_pred, last.action_cost_grad);
        }
    }
}

#[test]
fn true_action_cost_is_the_torque_cost_of_the_deterministic_action() {
    one_thread();
    let mut agent = Agent::new(tiny(Variant::Ddppo)).expect("agent");
    while agent.run_state().model_trainings == 0 {
        agent.step().expect("step");
    }
    // States chosen here: angles and velocities across Pendulum's range.
    let states: Vec<f32> = (0..40).flat_map(|i| [-3.0 + 0.15 * i as f32, 7.5 - 0.4 * i as f32]).collect();
    let probe = agent.policy_probe_at(&states, &mut ChaCha8Rng::seed_from_u64(9)).expect("probe");
    // Independently: the deterministic action from the policy's host copy,
    // clipped to the torque bound, and Pendulum's torque cost 0.001 u^2.
    let snap = agent.policy.snapshot().expect("snapshot");
    let expect = states
        .chunks(2)
        .map(|s| {
            let u = snap.mean_action(&[s[0] as f64, s[1] as f64])[0].clamp(-2.0, 2.0);
            0.001 * u * u
        })
        .sum::<f64>()
        / 40.0;
    let got = probe.action_cost_true.expect("truth after a model training");
    assert!((got - expect).abs() <= 1e-6 * expect.max(1e-3), "{got} vs {expect}");
    assert!(expect > 0.0);
    // The model's figures exist and the states' order does not matter to the truth.
    assert!(probe.action_cost_pred.is_some() && probe.reward_error_grad.is_some());
    let reversed: Vec<f32> = states.chunks(2).rev().flatten().copied().collect();
    let again = agent.policy_probe_at(&reversed, &mut ChaCha8Rng::seed_from_u64(9)).expect("probe");
    assert!((again.action_cost_true.unwrap() - got).abs() < 1e-12);
    // The critic's calibration: the discounted return of the deterministic
    // policy from the first 32 states, 300 steps of Pendulum's own dynamics
    // (it never terminates), computed here step by step.
    let gamma = agent.config().gamma;
    let expect_return = states
        .chunks(2)
        .take(32)
        .map(|s0| {
            let mut s = vec![s0[0] as f64, s0[1] as f64];
            let (mut ret, mut discount) = (0.0, 1.0);
            for _ in 0..300 {
                let (r, next) = Pendulum::new().transition(&s, &snap.mean_action(&s));
                ret += discount * r;
                discount *= gamma;
                s = next;
            }
            ret
        })
        .sum::<f64>()
        / 32.0;
    let got = probe.policy_return.expect("after critic updates");
    assert!((got - expect_return).abs() <= 1e-9 * expect_return.abs(), "{got} vs {expect_return}");
    assert!(probe.critic_q.is_some_and(f64::is_finite));
    // A state array that is not whole rows is an error.
    assert!(agent.policy_probe_at(&states[..3], &mut ChaCha8Rng::seed_from_u64(9)).is_err());
}
