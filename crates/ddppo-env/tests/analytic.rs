//! Pendulum and LinearEnv: Jacobians against central finite differences,
//! clipping, resets, episode limits and the linear system's config file.
use ddppo_env::{AnalyticDynamics, Env, LinearEnv, LinearSystem, Pendulum, Task, make};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::f64::consts::PI;

/// Central differences of `(r, s')` in each input; same layout as `jacobian`.
fn finite_difference_jacobian(env: &dyn AnalyticDynamics, s: &[f64], a: &[f64]) -> Vec<f64> {
    let n = s.len();
    let x: Vec<f64> = s.iter().chain(a).copied().collect();
    let f = |x: &[f64]| {
        let (r, next) = env.transition(&x[..n], &x[n..]);
        std::iter::once(r).chain(next).collect::<Vec<f64>>()
    };
    let rows = 1 + n;
    let cols = x.len();
    let mut jac = vec![0.0; rows * cols];
    let h = 1e-6;
    for j in 0..cols {
        let (mut xp, mut xm) = (x.clone(), x.clone());
        xp[j] += h;
        xm[j] -= h;
        let (fp, fm) = (f(&xp), f(&xm));
        for i in 0..rows {
            jac[i * cols + j] = (fp[i] - fm[i]) / (2.0 * h);
        }
    }
    jac
}

fn assert_close(analytic: &[f64], numeric: &[f64], tol: f64, ctx: &str) {
    assert_eq!(analytic.len(), numeric.len(), "{ctx}");
    for (k, (a, b)) in analytic.iter().zip(numeric).enumerate() {
        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{ctx}: entry {k}: analytic {a} vs finite difference {b}");
    }
}

#[test]
fn pendulum_jacobian_matches_finite_differences() {
    let env = Pendulum::new();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut checked = 0;
    while checked < 200 {
        let s = [rng.random_range(-3.0..3.0), rng.random_range(-9.0..9.0)];
        let a = [rng.random_range(-3.0..3.0)];
        // Stay away from the kinks: the torque and speed clips and theta's wrap.
        let (_, next) = env.transition(&s, &a);
        let raw_thd = s[1] + (15.0 * f64::sin(s[0]) + 3.0 * a[0].clamp(-2.0, 2.0)) * 0.05;
        let unwrapped = s[0] + next[1] * 0.05;
        if (a[0].abs() - 2.0).abs() < 1e-3 || (raw_thd.abs() - 8.0).abs() < 1e-3 || (unwrapped.abs() - PI).abs() < 1e-3
        {
            continue;
        }
        assert_close(
            &env.jacobian(&s, &a),
            &finite_difference_jacobian(&env, &s, &a),
            1e-6,
            &format!("s {s:?} a {a:?}"),
        );
        checked += 1;
    }
}

#[test]
fn pendulum_clipped_torque_and_speed_have_zero_gradient() {
    let env = Pendulum::new();
    // Torque beyond the limit: the action column is zero.
    let jac = env.jacobian(&[0.3, 0.1], &[2.5]);
    assert_eq!([jac[2], jac[5], jac[8]], [0.0, 0.0, 0.0]);
    // Speed at the limit: theta_dot' no longer depends on the state.
    let jac = env.jacobian(&[1.5, 7.9], &[1.9]);
    let (_, next) = env.transition(&[1.5, 7.9], &[1.9]);
    assert_eq!(next[1], Pendulum::MAX_SPEED);
    assert_eq!(&jac[6..9], &[0.0, 0.0, 0.0]);
}

#[test]
fn pendulum_follows_gym_dynamics() {
    // One step by hand: th = 1, thd = 2, u = 1.
    let env = Pendulum::new();
    let (r, next) = env.transition(&[1.0, 2.0], &[1.0]);
    let thd = 2.0 + (15.0 * 1f64.sin() + 3.0) * 0.05;
    assert!((next[1] - thd).abs() < 1e-15);
    assert!((next[0] - (1.0 + thd * 0.05)).abs() < 1e-15);
    assert!((r + (1.0 + 0.1 * 4.0 + 0.001)).abs() < 1e-15);
    // theta is wrapped into [-pi, pi).
    let (_, next) = env.transition(&[3.1, 3.0], &[0.0]);
    assert!(next[0] < -3.0 && next[0] >= -PI, "{next:?}");
}

#[test]
fn pendulum_reset_is_seeded_and_in_range_and_episodes_last_200_steps() {
    let mut env = Pendulum::new();
    let a = env.reset(5);
    assert_eq!(a, env.reset(5));
    assert_ne!(a, env.reset(6));
    for seed in 0..100 {
        let s = env.reset(seed);
        assert!((-PI..PI).contains(&s[0]) && (-1.0..1.0).contains(&s[1]), "{s:?}");
    }
    env.reset(0);
    for t in 1..=200 {
        let step = env.step(&[0.0]).unwrap();
        assert!(!step.terminated);
        assert_eq!(step.truncated, t == 200, "step {t}");
    }
}

#[test]
fn linear_jacobian_matches_finite_differences() {
    // A non-symmetric Q and R exercise the (Q + Q^T) s form of the gradient.
    let sys = LinearSystem {
        a: vec![vec![0.5, -0.3], vec![0.2, 0.8]],
        b: vec![vec![1.0, 0.5, -0.2], vec![0.0, -1.0, 0.3]],
        q: vec![vec![2.0, 0.5], vec![-0.1, 1.0]],
        r: vec![vec![0.3, 0.1, 0.0], vec![0.0, 0.2, 0.05], vec![0.1, 0.0, 0.4]],
    };
    let env = LinearEnv::new(sys).unwrap();
    let default_env = LinearEnv::default();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for _ in 0..100 {
        let s: Vec<f64> = (0..2).map(|_| rng.random_range(-2.0..2.0)).collect();
        let a: Vec<f64> = (0..3).map(|_| rng.random_range(-0.99..0.99)).collect();
        assert_close(&env.jacobian(&s, &a), &finite_difference_jacobian(&env, &s, &a), 1e-6, "custom system");
        let s: Vec<f64> = (0..3).map(|_| rng.random_range(-2.0..2.0)).collect();
        let a: Vec<f64> = (0..2).map(|_| rng.random_range(-0.99..0.99)).collect();
        assert_close(&default_env.jacobian(&s, &a), &finite_difference_jacobian(&default_env, &s, &a), 1e-6, "default");
    }
}

#[test]
fn linear_step_is_as_written_and_clips_actions() {
    let mut env = LinearEnv::default();
    env.set_state(&[1.0, -1.0, 0.5]).unwrap();
    let step = env.step(&[3.0, -0.5]).unwrap();
    // s' = A s + B clip(a) with clip(a) = (1, -0.5); r = -(s.s + 0.1 a.a).
    let expected = [0.9 - 0.1, -0.9 + 0.05 + 0.1, 0.45 - 0.05];
    assert_close(&step.obs, &expected, 1e-15, "next state");
    assert!((step.reward + (2.25 + 0.1 * 1.25)).abs() < 1e-14, "{}", step.reward);
    // The clipped component's column is zero, the other's is B's.
    let jac = LinearEnv::default().jacobian(&[1.0, -1.0, 0.5], &[3.0, -0.5]);
    for i in 1..4 {
        assert_eq!(jac[i * 5 + 3], 0.0);
    }
    assert_eq!(jac[3 * 5 + 4], 0.1);
}

#[test]
fn linear_reset_and_episode_limit() {
    let mut env = make(Task::Linear).unwrap();
    assert_eq!((env.obs_dim(), env.act_dim()), (Task::Linear.obs_dim(), Task::Linear.act_dim()));
    let s = env.reset(3);
    assert_eq!(s, env.reset(3));
    assert!(s.iter().all(|x| (-1.0..1.0).contains(x)));
    let mut steps = 0;
    loop {
        steps += 1;
        if env.step(&[0.0, 0.0]).unwrap().truncated {
            break;
        }
    }
    assert_eq!(steps, 200);
}

#[test]
fn configs_linear_toml_is_the_default_system() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/linear.toml");
    assert_eq!(LinearSystem::from_file(&path).unwrap(), LinearSystem::default());
}

#[test]
fn bad_linear_systems_are_clear_errors() {
    let err = LinearSystem::from_toml_str("a = [[1.0, 0.0]]\nb = [[1.0]]\nq = [[1.0]]\nr = [[1.0]]").unwrap_err();
    assert!(err.to_string().contains("`a` must be 1 x 1"), "{err}");
    let err = LinearSystem::from_toml_str("a = [[1.0]]\nb = [[1.0]]\nq = [[1.0]]").unwrap_err();
    assert!(err.to_string().contains("missing field `r`"), "{err}");
    let err = LinearSystem::from_toml_str("a = [[1.0]]\nb = [[1.0]]\nq = [[1.0]]\nr = [[1.0]]\nc = 1").unwrap_err();
    assert!(err.to_string().contains("unknown field `c`"), "{err}");
    let err = LinearSystem::from_file(std::path::Path::new("no/such/linear.toml")).unwrap_err();
    assert!(err.to_string().contains("no/such/linear.toml"), "{err}");
}

#[test]
fn bad_states_and_actions_are_errors() {
    let mut pendulum = Pendulum::new();
    assert_eq!(pendulum.set_state(&[0.0]).unwrap_err().to_string(), "state has 1 values, pendulum expects 2");
    assert_eq!(
        pendulum.set_state(&[0.0, f64::NAN]).unwrap_err().to_string(),
        "state component 1 is NaN; states must be finite"
    );
    assert_eq!(pendulum.step(&[]).unwrap_err().to_string(), "action has 0 components, pendulum expects 1");
    let mut linear = LinearEnv::default();
    assert!(linear.set_state(&[0.0; 2]).is_err());
    assert_eq!(
        linear.step(&[0.0, f64::NEG_INFINITY]).unwrap_err().to_string(),
        "action component 1 is -inf; actions must be finite"
    );
    // Nothing moved.
    assert_eq!(pendulum.state(), vec![0.0, 0.0]);
    assert_eq!(linear.state(), vec![0.0; 3]);
}
