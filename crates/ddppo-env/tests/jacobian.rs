//! The true step Jacobians `d(r, obs')/d(obs, a)` of `StepJacobian`, checked
//! two ways: on contact-free MuJoCo states against per-physics-step
//! linearisations chained over the frame skip and mapped to observation
//! coordinates by hand (MuJoCo's own `mjd_transitionFD` for HalfCheetah's
//! Euler integrator; for InvertedPendulum's RK4, which `mjd_transitionFD`
//! rejects, the chain rule through the four RK4 stages on MuJoCo's forward
//! dynamics); on the analytic envs against their exact Jacobians.
use ddppo_env::{AnalyticDynamics, Error, LinearEnv, Pendulum, Task, make_jacobian};

#[test]
fn analytic_envs_give_their_exact_jacobians() {
    let mut pendulum = make_jacobian(Task::Pendulum).unwrap();
    for (s, a) in [([0.5, -0.25], 1.0), ([-2.9, 6.0], -3.0), ([0.1, 0.2], 1.999)] {
        assert_eq!(pendulum.step_jacobian(&s, &[a]).unwrap(), Pendulum::new().jacobian(&s, &[a]));
    }
    let mut linear = make_jacobian(Task::Linear).unwrap();
    let (s, a) = ([0.3, -0.7, 1.1], [0.4, -1.5]);
    let exact = LinearEnv::default().jacobian(&s, &a);
    assert_eq!(linear.step_jacobian(&s, &a).unwrap(), exact);
    // Spot values: row 1 is A's first row, then B's first row; a_1 = -1.5 is clipped.
    assert_eq!(&exact[5..10], &[0.9, 0.1, 0.0, 0.0, 0.0]);
    assert_eq!(exact[5 * 3 + 4], 0.0);
}

#[test]
fn bad_inputs_are_errors() {
    let mut pendulum = make_jacobian(Task::Pendulum).unwrap();
    assert!(matches!(pendulum.step_jacobian(&[0.0], &[0.0]), Err(Error::StateLength { .. })));
    assert!(matches!(pendulum.step_jacobian(&[0.0, f64::NAN], &[0.0]), Err(Error::NonFiniteState { .. })));
    assert!(matches!(pendulum.step_jacobian(&[0.0, 0.0], &[0.0, 1.0]), Err(Error::ActionLength { .. })));
    #[cfg(feature = "mujoco")]
    {
        let mut hopper = make_jacobian(Task::Hopper).unwrap();
        let e = hopper.step_jacobian(&[0.0; 10], &[0.0; 3]).unwrap_err();
        assert_eq!(e.to_string(), "observation has 10 values, hopper expects 11");
        let e = hopper.step_jacobian(&[0.0; 11], &[0.0, f64::INFINITY, 0.0]).unwrap_err();
        assert!(e.to_string().contains("action component 1 is inf"), "{e}");
    }
}

#[cfg(feature = "mujoco")]
mod mujoco {
    use ddppo_env::{Env, MujocoJacobian, MujocoModel, StepJacobian, Task};
    use mujoco_rs::mujoco_c::{mjd_transitionFD, mjtIntegrator};
    use mujoco_rs::prelude::{MjData, MjModel};
    use std::ptr::null_mut;
    use std::sync::Arc;

    /// `a (n x k) * b (k x p)`, row-major.
    fn matmul(a: &[f64], b: &[f64], n: usize, k: usize, p: usize) -> Vec<f64> {
        let mut out = vec![0.0; n * p];
        for i in 0..n {
            for l in 0..k {
                let x = a[i * k + l];
                for j in 0..p {
                    out[i * p + j] += x * b[l * p + j];
                }
            }
        }
        out
    }

    /// `x_{t+1} = A x_t + B u` of one physics step at the data's state, for
    /// the Euler integrator: MuJoCo's own `mjd_transitionFD` (centred, eps
    /// 1e-6). It rejects RK4 models.
    fn euler_linearisation(m: &MjModel, data: &mut MjData<Arc<MjModel>>, n: usize, nu: usize) -> (Vec<f64>, Vec<f64>) {
        let (mut a, mut b) = (vec![0.0; n * n], vec![0.0; n * nu]);
        // SAFETY: the model and data are valid, A is (2nv + na)^2 and B
        // (2nv + na) x nu as MuJoCo's API requires; C and D are not wanted.
        unsafe {
            mjd_transitionFD(
                m.ffi(),
                data.ffi_mut(),
                1e-6,
                true,
                a.as_mut_ptr(),
                b.as_mut_ptr(),
                null_mut(),
                null_mut(),
            );
        }
        (a, b)
    }

    /// The same for MuJoCo's RK4 integrator, by the chain rule through the
    /// four stages `k_i = f(x_i)` of `x' = x + h/6 (k1 + 2 k2 + 2 k3 + k4)`,
    /// with `f(x, u) = (qvel, qacc)` from `mj_forward` and its derivative by
    /// central differences (eps 1e-6). Only for `nq == nv` (no quaternions).
    fn rk4_linearisation(
        m: &Arc<MjModel>,
        data: &mut MjData<Arc<MjModel>>,
        n: usize,
        nu: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let nv = n / 2;
        let h = m.opt().timestep;
        let (x0, u): (Vec<f64>, Vec<f64>) = ([data.qpos(), data.qvel()].concat(), data.ctrl().to_vec());
        let mut scratch = MjData::new(m.clone());
        let mut f = |z: &[f64]| -> Vec<f64> {
            scratch.qpos_mut().copy_from_slice(&z[..nv]);
            scratch.qvel_mut().copy_from_slice(&z[nv..n]);
            scratch.ctrl_mut().copy_from_slice(&z[n..]);
            scratch.forward();
            [scratch.qvel(), scratch.qacc()].concat()
        };
        // d f / d(x, u) at z, n x (n + nu).
        let df = |f: &mut dyn FnMut(&[f64]) -> Vec<f64>, z: &[f64]| -> Vec<f64> {
            let cols = z.len();
            let mut out = vec![0.0; n * cols];
            let mut p = z.to_vec();
            for j in 0..cols {
                p[j] = z[j] + 1e-6;
                let plus = f(&p);
                p[j] = z[j] - 1e-6;
                let minus = f(&p);
                p[j] = z[j];
                for i in 0..n {
                    out[i * cols + j] = (plus[i] - minus[i]) / 2e-6;
                }
            }
            out
        };
        let cols = n + nu;
        // D_i = d(x_i, u)/d(x, u), (n + nu) x (n + nu); dk_i = df(z_i) D_i.
        let eye: Vec<f64> = (0..cols * cols).map(|k| if k / cols == k % cols { 1.0 } else { 0.0 }).collect();
        let (mut x, mut d) = (x0.clone(), eye.clone());
        let mut total = vec![0.0; n * cols];
        for (stage, (weight, next)) in [(1.0, 0.5), (2.0, 0.5), (2.0, 1.0), (1.0, 0.0)].into_iter().enumerate() {
            let z: Vec<f64> = x.iter().chain(&u).copied().collect();
            let k = f(&z);
            let dk = matmul(&df(&mut f, &z), &d, n, cols, cols);
            total.iter_mut().zip(&dk).for_each(|(t, v)| *t += weight * v);
            if stage < 3 {
                x = x0.iter().zip(&k).map(|(a, b)| a + next * h * b).collect();
                d = eye.clone();
                for i in 0..n {
                    for j in 0..cols {
                        d[i * cols + j] += next * h * dk[i * cols + j];
                    }
                }
            }
        }
        let (mut a, mut b) = (vec![0.0; n * n], vec![0.0; n * nu]);
        for i in 0..n {
            for j in 0..cols {
                let v = h / 6.0 * total[i * cols + j] + if i == j { 1.0 } else { 0.0 };
                if j < n { a[i * n + j] = v } else { b[i * nu + j - n] = v }
            }
        }
        (a, b)
    }

    /// The reference: the per-physics-step linearisations along the
    /// trajectory, chained over the frame skip into `d x_K / d x_0` and
    /// `d x_K / d u` (full state `x = (qpos, qvel)`, `2nv x 2nv`, `2nv x nu`).
    /// Only for models without quaternions (`nq == nv`) or activations, and
    /// only on contact- and limit-free trajectories (asserted).
    fn chained_transition_fd(model: &MujocoModel, qpos: &[f64], qvel: &[f64], action: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let m = model.model().clone();
        let (nq, nv, nu, na) = (m.ffi().nq as usize, m.ffi().nv as usize, m.ffi().nu as usize, m.ffi().na as usize);
        assert_eq!((nq, na), (nv, 0), "{}: the chain below assumes nq == nv and no activations", model.task());
        let n = 2 * nv;
        let mut data = MjData::new(m.clone());
        data.qpos_mut().copy_from_slice(qpos);
        data.qvel_mut().copy_from_slice(qvel);
        data.ctrl_mut().copy_from_slice(action);
        data.forward();
        let rk4 = m.opt().integrator == mjtIntegrator::mjINT_RK4 as i32;
        let mut t: Vec<f64> = (0..n * n).map(|k| if k / n == k % n { 1.0 } else { 0.0 }).collect();
        let mut s = vec![0.0; n * nu];
        for _ in 0..model.frame_skip() {
            assert_eq!(
                (data.ffi().ncon, data.ffi().nefc),
                (0, 0),
                "{}: the state must be contact- and limit-free",
                model.task()
            );
            let (a, b) =
                if rk4 { rk4_linearisation(&m, &mut data, n, nu) } else { euler_linearisation(&m, &mut data, n, nu) };
            t = matmul(&a, &t, n, n, n);
            s = matmul(&a, &s, n, n, nu);
            s.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            data.step();
        }
        (t, s)
    }

    /// The reference Jacobian in observation coordinates `(r, obs') x (obs, a)`
    /// for a task whose observation is `x[hidden..]` and whose reward is
    /// `fwd * (qpos'_0 - qpos_0) / dt - ctrl_cost |a|^2 + const`.
    fn reference(task: Task, obs: &[f64], action: &[f64], hidden: usize, fwd: f64, ctrl_cost: f64) -> Vec<f64> {
        let model = MujocoModel::load(task).unwrap();
        let (qpos, qvel) = model.state_from_observation(obs).unwrap();
        let (t, s) = chained_transition_fd(&model, &qpos, &qvel, action);
        let (nv, nu) = (qvel.len(), action.len());
        let n = 2 * nv;
        let d = n - hidden;
        let cols = d + nu;
        let mut jac = vec![0.0; (1 + d) * cols];
        let state_row = |row: usize| -> Vec<f64> {
            (hidden..n).map(|c| t[row * n + c]).chain((0..nu).map(|c| s[row * nu + c])).collect()
        };
        let reward_row: Vec<f64> = state_row(0).iter().map(|x| fwd * x / model.dt()).collect();
        jac[..cols].copy_from_slice(&reward_row);
        for (j, a) in action.iter().enumerate() {
            jac[d + j] -= 2.0 * ctrl_cost * a;
        }
        for i in 0..d {
            jac[(1 + i) * cols..(2 + i) * cols].copy_from_slice(&state_row(hidden + i));
        }
        jac
    }

    fn assert_close(task: Task, ours: &[f64], reference: &[f64], cols: usize) {
        assert_eq!(ours.len(), reference.len());
        let scale = reference.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for (k, (a, b)) in ours.iter().zip(reference).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * scale.max(1.0),
                "{task}: entry ({}, {}) is {a}, MuJoCo's chained transition derivatives give {b}",
                k / cols,
                k % cols
            );
        }
    }

    #[test]
    fn inverted_pendulum_matches_the_chained_rk4_stages() {
        let task = Task::InvertedPendulum;
        let mut ours = MujocoJacobian::new(&MujocoModel::load(task).unwrap());
        for (obs, a) in [([0.1, 0.05, 0.2, -0.3], 0.5), ([-0.3, -0.15, -0.4, 0.6], -2.0)] {
            let jac = ours.step_jacobian(&obs, &[a]).unwrap();
            // Reward 1 on every step: a zero row. The state is the observation.
            let reference = reference(task, &obs, &[a], 0, 0.0, 0.0);
            assert!(jac[..5].iter().all(|x| *x == 0.0));
            assert_close(task, &jac, &reference, 5);
            // Not a trivial agreement: the pole's response to the cart force is there.
            assert!(jac[4 * 5 + 4].abs() > 0.1, "d theta_dot' / d a = {}", jac[4 * 5 + 4]);
        }
    }

    #[test]
    fn half_cheetah_in_the_air_matches_chained_mjd_transition_fd() {
        let task = Task::HalfCheetah;
        let model = MujocoModel::load(task).unwrap();
        let mut ours = MujocoJacobian::new(&model);
        // rootz = 1.5 lifts the torso 1.5 m above its default height; small
        // joint angles and velocities stay clear of every joint limit.
        let qpos = [0.0, 1.5, 0.05, 0.1, -0.1, 0.05, -0.05, 0.1, 0.0];
        let qvel = [1.0, 0.2, -0.3, 0.5, -0.4, 0.3, 0.2, -0.5, 0.4];
        let obs: Vec<f64> = qpos[1..].iter().chain(&qvel).copied().collect();
        let action = [0.1, -0.2, 0.05, 0.15, -0.1, 0.05];
        let jac = ours.step_jacobian(&obs, &action).unwrap();
        // v2 reward: forward velocity (x'_0 - x_0) / dt - 0.1 |a|^2.
        let reference = reference(task, &obs, &action, 1, 1.0, 0.1);
        assert_close(task, &jac, &reference, 23);
        // The reward row carries d x'_0 / d vx = dt / dt, about 1.
        assert!((jac[8] - 1.0).abs() < 0.1, "d r / d vx = {}", jac[8]);
    }

    #[test]
    fn observations_round_trip_through_the_rebuilt_state() {
        for task in [Task::InvertedPendulum, Task::Hopper, Task::Walker2d, Task::HalfCheetah, Task::Ant, Task::Humanoid]
        {
            let model = MujocoModel::load(task).unwrap();
            let mut env = model.make_env();
            let obs = env.reset(3);
            let (qpos, qvel) = model.state_from_observation(&obs).unwrap();
            let (mut q0, v0) = env.state();
            let hidden = q0.len() + v0.len() - obs.len();
            q0[..hidden].iter_mut().for_each(|x| *x = 0.0);
            assert_eq!((qpos, qvel), (q0, v0), "{task}");
        }
    }

    #[test]
    fn the_jacobian_goes_through_the_velocity_clip_and_the_ant_quaternion() {
        // Hopper (in the air): an observed velocity that leaves the +-10 clip has a zero row.
        let model = MujocoModel::load(Task::Hopper).unwrap();
        let mut jac = MujocoJacobian::new(&model);
        let mut obs = vec![2.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        obs[10] = 9.99; // foot joint velocity, free to pass 10 within one step
        let (_, next) = jac.transition(&obs, &[0.0, 0.0, 1.0]).unwrap();
        assert_eq!(next[10], 10.0, "the clip is reached");
        let j = jac.step_jacobian(&obs, &[0.0, 0.0, 1.0]).unwrap();
        assert!(j[11 * 14..12 * 14].iter().all(|x| *x == 0.0), "{:?}", &j[11 * 14..]);
        assert!(j[10 * 14..11 * 14].iter().any(|x| *x != 0.0));
        // Ant: scaling the quaternion (obs 1..5) changes nothing MuJoCo
        // computes, so the Jacobian applied to the quaternion itself is ~0.
        let ant = MujocoModel::load(Task::Ant).unwrap();
        let mut env = ant.make_env();
        let obs = env.reset(5);
        let mut jac = MujocoJacobian::new(&ant);
        let j = jac.step_jacobian(&obs, &[0.1; 8]).unwrap();
        let cols = 27 + 8;
        for row in 0..28 {
            let along: f64 = (1..5).map(|c| j[row * cols + c] * obs[c]).sum();
            let scale = (0..cols).map(|c| j[row * cols + c].abs()).fold(0.0, f64::max);
            assert!(along.abs() <= 1e-4 * scale.max(1.0), "row {row}: J q = {along}");
        }
    }
}
