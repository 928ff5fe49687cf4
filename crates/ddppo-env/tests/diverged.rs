//! A diverged simulation is an error, never a silent reset: MuJoCo's
//! instability check (a NaN, infinite or > 1e10 value in qpos, qvel, qacc or
//! ctrl) resets the data and carries on, which would hand back the model's
//! default pose as the step's result.
#![cfg(feature = "mujoco")]
use ddppo_env::{Env, Error, MujocoEnv, Task};

#[test]
fn a_huge_state_is_a_divergence_error_and_reset_recovers() {
    let mut env = MujocoEnv::new(Task::InvertedPendulum).unwrap();
    env.reset(3);
    env.set_state(&[1e308, 0.0], &[0.0, 0.0]).unwrap();
    match env.step(&[0.0]) {
        Err(Error::SimulationDiverged { task, step, quantity, index }) => {
            assert_eq!((task, step, quantity, index), ("inverted-pendulum", 1, "qpos", 0));
        }
        other => panic!("expected a divergence error, got {other:?}"),
    }
    // A second divergence in the same data is seen too (MuJoCo's counters
    // would otherwise stay at the first one's count).
    env.reset(3);
    env.set_state(&[0.0, 0.0], &[1e300, 0.0]).unwrap();
    let err = env.step(&[0.0]).unwrap_err();
    assert!(matches!(err, Error::SimulationDiverged { quantity: "qvel", .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("diverged") && !text.contains('\n'), "{text}");
    // After a reset the env steps exactly as a fresh one.
    let mut fresh = MujocoEnv::new(Task::InvertedPendulum).unwrap();
    assert_eq!(env.reset(9), fresh.reset(9));
    for t in 0..20 {
        let a = [((t as f64) * 0.7).sin()];
        assert_eq!(env.step(&a).unwrap(), fresh.step(&a).unwrap(), "step {t}");
    }
}
