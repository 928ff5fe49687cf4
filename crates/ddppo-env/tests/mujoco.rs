//! The MuJoCo tasks' shapes, resets, v2 observation details, episode limit
//! and input errors (the step semantics are checked against gymnasium in
//! `parity.rs`).
#![cfg(feature = "mujoco")]
use ddppo_env::{Env, Error, MujocoEnv, MujocoModel, Task, make};

const MUJOCO_TASKS: [Task; 6] =
    [Task::InvertedPendulum, Task::Hopper, Task::Walker2d, Task::HalfCheetah, Task::Ant, Task::Humanoid];

#[test]
fn dimensions_bounds_and_limits() {
    for task in MUJOCO_TASKS {
        let mut env = make(task).unwrap();
        assert_eq!(env.reset(0).len(), task.obs_dim(), "{task}");
        assert_eq!(env.obs_dim(), task.obs_dim());
        assert_eq!(env.act_dim(), task.act_dim());
        assert_eq!(env.action_low().len(), task.act_dim());
        assert!(env.action_low().iter().zip(env.action_high()).all(|(l, h)| l < h), "{task}");
        assert_eq!(env.max_episode_steps(), 1000);
    }
    // gym's action boxes come from the XMLs' ctrlrange.
    assert_eq!(make(Task::Humanoid).unwrap().action_high()[0], 0.4);
    assert_eq!(make(Task::InvertedPendulum).unwrap().action_low(), &[-3.0]);
}

#[test]
fn frame_skips_match_gym() {
    for (task, skip, dt) in [
        (Task::InvertedPendulum, 2, 0.04),
        (Task::Hopper, 4, 0.008),
        (Task::Walker2d, 4, 0.008),
        (Task::HalfCheetah, 5, 0.05),
        (Task::Ant, 5, 0.05),
        (Task::Humanoid, 5, 0.015),
    ] {
        let model = MujocoModel::load(task).unwrap();
        assert_eq!(model.frame_skip(), skip, "{task}");
        assert!((model.dt() - dt).abs() < 1e-12, "{task}: dt {}", model.dt());
    }
}

#[test]
fn reset_is_seeded_and_perturbs_the_default_pose_within_gyms_noise() {
    for (task, pos_noise) in [
        (Task::InvertedPendulum, 0.01),
        (Task::Hopper, 5e-3),
        (Task::Walker2d, 5e-3),
        (Task::HalfCheetah, 0.1),
        (Task::Ant, 0.1),
        (Task::Humanoid, 0.01),
    ] {
        let model = MujocoModel::load(task).unwrap();
        let mut env = model.make_env();
        let qpos0 = env.state().0;
        let obs = env.reset(11);
        assert_eq!(obs, env.reset(11), "{task}");
        assert_ne!(obs, env.reset(12), "{task}");
        let (qpos, qvel) = env.state();
        let max_dev = qpos.iter().zip(&qpos0).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(max_dev > 0.0 && max_dev <= pos_noise, "{task}: qpos moved {max_dev}");
        assert!(qvel.iter().any(|v| *v != 0.0), "{task}");
        assert_eq!(env.elapsed_steps(), 0);
    }
}

#[test]
fn hopper_observes_velocities_clipped_to_ten_but_keeps_them_in_the_state() {
    let mut env = MujocoEnv::new(Task::Hopper).unwrap();
    let (qpos, mut qvel) = env.state();
    qvel[3] = 25.0;
    qvel[4] = -12.0;
    env.set_state(&qpos, &qvel).unwrap();
    let obs = env.observation();
    // obs = qpos[1:] (5) + clip(qvel, -10, 10) (6)
    assert_eq!(&obs[8..10], &[10.0, -10.0]);
    assert_eq!(env.state().1[3], 25.0);
}

#[test]
fn ant_and_humanoid_observe_qpos_from_index_two() {
    for task in [Task::Ant, Task::Humanoid] {
        let mut env = MujocoEnv::new(task).unwrap();
        let obs = env.reset(3);
        let (qpos, qvel) = env.state();
        assert_eq!(obs, [&qpos[2..], &qvel[..]].concat(), "{task}");
    }
}

#[test]
fn half_cheetah_truncates_after_1000_steps() {
    let mut env = make(Task::HalfCheetah).unwrap();
    env.reset(0);
    let action = vec![0.1; 6];
    for t in 1..=1000 {
        let step = env.step(&action).unwrap();
        assert!(!step.terminated);
        assert_eq!(step.truncated, t == 1000, "step {t}");
    }
}

#[test]
fn bad_actions_and_states_are_errors_that_leave_the_env_untouched() {
    let mut env = MujocoEnv::new(Task::Hopper).unwrap();
    env.reset(0);
    let before = env.state();
    let err = env.step(&[0.0, 0.0]).unwrap_err();
    assert!(matches!(err, Error::ActionLength { expected: 3, got: 2, .. }), "{err}");
    assert_eq!(err.to_string(), "action has 2 components, hopper expects 3");
    let err = env.step(&[0.0, f64::NAN, 0.0]).unwrap_err();
    assert_eq!(err.to_string(), "action component 1 is NaN; actions must be finite");
    let err = env.step(&[f64::INFINITY, 0.0, 0.0]).unwrap_err();
    assert!(matches!(err, Error::NonFiniteAction { index: 0, .. }), "{err}");
    assert_eq!(env.state(), before);
    assert_eq!(env.elapsed_steps(), 0);
    let err = env.set_state(&before.0[1..], &before.1).unwrap_err();
    assert_eq!(err.to_string(), "qpos has 5 values, hopper expects 6");
    let err = env.set_state(&before.0, &[f64::NAN; 6]).unwrap_err();
    assert!(matches!(err, Error::NonFiniteState { what: "qvel", index: 0, .. }), "{err}");
    assert_eq!(env.state(), before);
}

#[test]
fn envs_of_one_model_share_it_and_step_independently() {
    let model = MujocoModel::load(Task::Walker2d).unwrap();
    let (mut a, mut b) = (model.make_env(), model.make_env());
    assert!(std::sync::Arc::ptr_eq(a.model(), model.model()) && std::sync::Arc::ptr_eq(b.model(), model.model()));
    let (oa, ob) = (a.reset(1), b.reset(1));
    assert_eq!(oa, ob);
    let sa = a.step(&[0.5; 6]).unwrap();
    // b has not moved; stepping it the same way reproduces a's step.
    assert_eq!(b.observation(), ob);
    assert_eq!(b.step(&[0.5; 6]).unwrap(), sa);
}

#[test]
fn analytic_tasks_are_not_mujoco_models() {
    let err = MujocoModel::load(Task::Pendulum).err().unwrap();
    assert_eq!(err.to_string(), "pendulum is not a MuJoCo task");
}
