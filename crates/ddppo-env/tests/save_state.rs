//! `Env::save_state` / `restore_state`: a restored env steps bit for bit as
//! the one it was saved from (what a resumed training run relies on).

use ddppo_env::{Env, Task, make};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn actions(env: &dyn Env, n: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| env.action_low().iter().zip(env.action_high()).map(|(l, h)| rng.random_range(*l..*h)).collect())
        .collect()
}

fn check_task(task: Task) {
    let mut a = make(task).unwrap();
    a.reset(7);
    let acts = actions(a.as_ref(), 60, 11);
    // Mid-episode: 25 steps in (reset again if the task terminates early).
    for act in &acts[..25] {
        if a.step(act).unwrap().terminated {
            a.reset(8);
        }
    }
    let saved = a.save_state();
    let mut b = make(task).unwrap();
    b.reset(99); // some other state, overwritten by the restore
    b.restore_state(&saved).unwrap();
    for (i, act) in acts[25..].iter().enumerate() {
        let (ra, rb) = (a.step(act).unwrap(), b.step(act).unwrap());
        assert_eq!(ra, rb, "{} diverged {i} steps after the restore", task.name());
        if ra.terminated {
            break;
        }
    }
    assert_eq!(a.save_state(), b.save_state(), "{}", task.name());
}

#[test]
fn analytic_envs_restore_exactly() {
    check_task(Task::Pendulum);
    check_task(Task::Linear);
}

#[cfg(feature = "mujoco")]
#[test]
fn mujoco_envs_restore_exactly() {
    for task in Task::ALL.into_iter().filter(|t| t.is_mujoco()) {
        check_task(task);
    }
}

#[test]
fn a_bad_saved_state_is_an_error_and_changes_nothing() {
    let mut env = make(Task::Pendulum).unwrap();
    env.reset(1);
    let before = env.save_state();
    for bad in [vec![0.0; 2], vec![1.0, f64::NAN, 0.0], vec![-1.0, 0.0, 0.0], vec![1.5, 0.0, 0.0]] {
        let err = env.restore_state(&bad).unwrap_err().to_string();
        assert!(err.contains("saved pendulum env state is invalid"), "{err}");
        assert_eq!(env.save_state(), before);
    }
}
