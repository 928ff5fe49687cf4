//! The evaluation runner: results independent of the worker count, equal
//! to a plain sequential loop, and errors passed through.
use ddppo_env::{EnvFactory, Error, Task, evaluate, make};

/// A deterministic, state-dependent policy for any task.
fn policy_for(task: Task) -> impl Fn(&[f64]) -> Vec<f64> + Sync {
    let act_dim = task.act_dim();
    move |obs: &[f64]| (0..act_dim).map(|i| 0.3 * (obs[i % obs.len()] * (i + 1) as f64).sin()).collect()
}

/// The same episodes, one after the other, by hand.
fn sequential_returns(task: Task, policy: &dyn Fn(&[f64]) -> Vec<f64>, episodes: usize, base_seed: u64) -> Vec<f64> {
    let mut env = make(task).unwrap();
    (0..episodes as u64)
        .map(|i| {
            let mut obs = env.reset(base_seed + i);
            let mut ret = 0.0;
            loop {
                let step = env.step(&policy(&obs)).unwrap();
                ret += step.reward;
                if step.terminated || step.truncated {
                    return ret;
                }
                obs = step.obs;
            }
        })
        .collect()
}

#[test]
fn pendulum_returns_do_not_depend_on_worker_count() {
    let policy = policy_for(Task::Pendulum);
    let expected = sequential_returns(Task::Pendulum, &policy, 7, 100);
    for workers in [1, 2, 3, 8] {
        assert_eq!(evaluate(Task::Pendulum, &policy, 7, 100, workers).unwrap(), expected, "{workers} workers");
    }
    // Different seeds, different episodes.
    assert_ne!(evaluate(Task::Pendulum, &policy, 7, 200, 2).unwrap(), expected);
}

#[cfg(feature = "mujoco")]
#[test]
fn hopper_returns_do_not_depend_on_worker_count() {
    let policy = policy_for(Task::Hopper);
    let expected = sequential_returns(Task::Hopper, &policy, 4, 5);
    for workers in [1, 2, 3] {
        assert_eq!(evaluate(Task::Hopper, &policy, 4, 5, workers).unwrap(), expected, "{workers} workers");
    }
    let factory = EnvFactory::new(Task::Hopper).unwrap();
    let stats = ddppo_env::evaluate_episodes(&factory, &policy, 4, 5, 2).unwrap();
    assert!(stats.iter().all(|s| s.len >= 1 && s.len <= 1000));
}

#[test]
fn policy_errors_and_zero_workers_are_reported() {
    let bad = |_: &[f64]| vec![0.0, 0.0];
    let err = evaluate(Task::Pendulum, &bad, 3, 0, 2).unwrap_err();
    assert!(matches!(err, Error::ActionLength { expected: 1, got: 2, .. }), "{err}");
    let nan = |_: &[f64]| vec![f64::NAN];
    assert!(matches!(evaluate(Task::Pendulum, &nan, 3, 0, 1).unwrap_err(), Error::NonFiniteAction { .. }));
    let ok = |_: &[f64]| vec![0.0];
    assert_eq!(
        evaluate(Task::Pendulum, &ok, 3, 0, 0).unwrap_err().to_string(),
        "evaluation: needs at least one worker"
    );
    assert_eq!(evaluate(Task::Pendulum, &ok, 0, 0, 2).unwrap(), Vec::<f64>::new());
}

#[test]
fn linear_factory_makes_default_envs() {
    let factory = EnvFactory::new(Task::Linear).unwrap();
    let env = factory.make().unwrap();
    assert_eq!((env.obs_dim(), env.act_dim()), (3, 2));
}
