//! Exactness of the tangent directional derivatives and of the loss gradients,
//! against central finite differences in f64.
use candle_core::{DType, Device, Tensor};
use ddppo_models::{EnsembleConfig, LossBatch, NeighbourBatch, ProbabilisticEnsemble};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const OBS: usize = 3;
const ACT: usize = 2;
const IN: usize = OBS + ACT;
const OUT: usize = 1 + OBS;

fn small_cfg() -> EnsembleConfig {
    EnsembleConfig {
        ensemble_size: 3,
        elites: 2,
        hidden: 7,
        hidden_layers: 3,
        weight_decay: vec![2.5e-5, 5e-5, 7.5e-5, 1e-4],
        ..Default::default()
    }
}

fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// A small f64 ensemble with a non-trivial scaler and non-zero biases, so every
/// term of the tangent recursion matters.
fn model(seed: u64) -> ProbabilisticEnsemble {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ens = ProbabilisticEnsemble::new(OBS, ACT, &small_cfg(), &Device::Cpu, DType::F64, &mut rng).unwrap();
    ens.set_scaler(rand_vec(&mut rng, IN, 1.0), (0..IN).map(|_| rng.random_range(0.5..2.0)).collect()).unwrap();
    let vars = ens.varmap().all_vars();
    for v in vars {
        let n = v.elem_count();
        let noise = Tensor::from_vec(rand_vec(&mut rng, n, 0.3), v.dims(), &Device::Cpu).unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
    ens
}

fn t3(v: Vec<f64>, a: usize, b: usize, c: usize) -> Tensor {
    Tensor::from_vec(v, (a, b, c), &Device::Cpu).unwrap()
}

/// g(x) = (r, s') of member `m` at raw x, via the rollout API's `mean`.
fn g(ens: &ProbabilisticEnsemble, x: &[f64], m: usize) -> Vec<f64> {
    let obs = Tensor::from_slice(&x[..OBS], (1, OBS), &Device::Cpu).unwrap();
    let act = Tensor::from_slice(&x[OBS..], (1, ACT), &Device::Cpu).unwrap();
    let step = ens.mean(&obs, &act, &[m]).unwrap();
    let mut out = step.reward.to_vec1::<f64>().unwrap();
    out.extend(step.next_obs.flatten_all().unwrap().to_vec1::<f64>().unwrap());
    out
}

#[test]
fn tangent_jvp_equals_finite_differences_and_full_jacobian() {
    // k < in: the directions are propagated; k > in: the Jacobian's columns are,
    // then contracted with the directions.
    for k in [3, 7] {
        jvp_matches(k);
    }
}

fn jvp_matches(k: usize) {
    let ens = model(1);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (e, b) = (3, 4);
    let x = rand_vec(&mut rng, e * b * IN, 1.5);
    let v = rand_vec(&mut rng, e * b * k * IN, 0.7);
    let jv = ens.jvp(&t3(x.clone(), e, b, IN), &t3(v.clone(), e, b * k, IN), k).unwrap();
    let jv = jv.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let h = 1e-5;
    let mut worst: f64 = 0.0;
    for m in 0..e {
        // Full Jacobian of member m at its rows.
        let xm = &x[m * b * IN..(m + 1) * b * IN];
        let obs = Tensor::from_vec(
            (0..b).flat_map(|r| xm[r * IN..r * IN + OBS].to_vec()).collect::<Vec<_>>(),
            (b, OBS),
            &Device::Cpu,
        )
        .unwrap();
        let act = Tensor::from_vec(
            (0..b).flat_map(|r| xm[r * IN + OBS..(r + 1) * IN].to_vec()).collect::<Vec<_>>(),
            (b, ACT),
            &Device::Cpu,
        )
        .unwrap();
        let jac = ens.jacobian(&obs, &act, m).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for r in 0..b {
            let x0 = &xm[r * IN..(r + 1) * IN];
            for d in 0..k {
                let row = (m * b + r) * k + d;
                let dir = &v[row * IN..(row + 1) * IN];
                let xp: Vec<f64> = x0.iter().zip(dir).map(|(a, c)| a + h * c).collect();
                let xn: Vec<f64> = x0.iter().zip(dir).map(|(a, c)| a - h * c).collect();
                let (gp, gn) = (g(&ens, &xp, m), g(&ens, &xn, m));
                for o in 0..OUT {
                    let fd = (gp[o] - gn[o]) / (2.0 * h);
                    let tan = jv[row * OUT + o];
                    let full: f64 = (0..IN).map(|i| jac[(r * OUT + o) * IN + i] * dir[i]).sum();
                    assert!(
                        (fd - tan).abs() < 1e-6 * (1.0 + fd.abs()),
                        "member {m} row {r} dir {d} out {o}: fd {fd} tangent {tan}"
                    );
                    assert!((full - tan).abs() < 1e-10 * (1.0 + tan.abs()), "jacobian·v {full} vs tangent {tan}");
                    worst = worst.max((fd - tan).abs());
                }
            }
        }
    }
    assert!(worst > 0.0, "the comparison must have run");
}

#[test]
fn loss_gradients_match_finite_differences_for_every_tensor() {
    // Both ways of forming J · v (k < in and k > in).
    for k in [2, 7] {
        loss_gradients_match(k);
    }
}

fn loss_gradients_match(k: usize) {
    let ens = model(3);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (e, b, bg) = (3, 5, 4);
    let batch = LossBatch {
        x: t3(rand_vec(&mut rng, e * b * IN, 1.5), e, b, IN),
        y: t3(rand_vec(&mut rng, e * b * OUT, 1.0), e, b, OUT),
        neighbours: Some(NeighbourBatch {
            points: t3(rand_vec(&mut rng, e * bg * IN, 1.5), e, bg, IN),
            directions: t3(rand_vec(&mut rng, e * bg * k * IN, 0.5), e, bg * k, IN),
            differences: t3(rand_vec(&mut rng, e * bg * k * OUT, 0.5), e, bg * k, OUT),
            k,
        }),
    };
    let w = 0.7;
    let loss = ens.loss(&batch, w).unwrap();
    let grads = loss.total.backward().unwrap();
    let value = |ens: &ProbabilisticEnsemble| ens.loss(&batch, w).unwrap().total.to_scalar::<f64>().unwrap();
    let data = ens.varmap().data().lock().unwrap().clone();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    assert_eq!(names.len(), 2 * 4 + 2, "weights and biases of 4 layers plus the two log-variance bounds");
    let h = 1e-6;
    for name in names {
        let var = &data[&name];
        let gr = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let gr = gr.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let n = base.len();
        for &i in &[0, n / 2, n - 1] {
            let mut p = base.clone();
            p[i] += h;
            var.set(&Tensor::from_vec(p.clone(), var.dims(), &Device::Cpu).unwrap()).unwrap();
            let lp = value(&ens);
            p[i] -= 2.0 * h;
            var.set(&Tensor::from_vec(p, var.dims(), &Device::Cpu).unwrap()).unwrap();
            let ln = value(&ens);
            var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap()).unwrap();
            let fd = (lp - ln) / (2.0 * h);
            assert!((fd - gr[i]).abs() < 1e-5 * (1.0 + fd.abs()), "{name}[{i}]: autograd {} vs fd {fd}", gr[i]);
        }
    }
}

#[test]
fn softplus_is_stable_and_exact() {
    let x = Tensor::new(&[-800.0f64, -20.0, -1.0, 0.0, 1.0, 20.0, 800.0], &Device::Cpu).unwrap();
    let y = ddppo_models::softplus(&x).unwrap().to_vec1::<f64>().unwrap();
    for (xi, yi) in [-800.0f64, -20.0, -1.0, 0.0, 1.0, 20.0, 800.0].iter().zip(&y) {
        let exact = if *xi > 30.0 { *xi } else { xi.exp().ln_1p() };
        assert!(
            yi.is_finite() && (yi - exact).abs() <= 1e-12 * (1.0 + exact.abs()),
            "softplus({xi}) = {yi}, want {exact}"
        );
    }
}

/// All `m`-subsets of `0..n`, in lexicographic order.
fn subsets(n: usize, m: usize) -> Vec<Vec<usize>> {
    if m == 0 {
        return vec![vec![]];
    }
    (m - 1..n)
        .flat_map(|last| {
            subsets(last, m - 1).into_iter().map(move |mut s| {
                s.push(last);
                s
            })
        })
        .collect()
}

/// `gradient.directions_per_step = m`: each point's `R` from `m` of its `n`
/// neighbours. Averaged over every choice of subsets (independently per point,
/// so over all C(n, m)^3 combinations for 3 points), the estimate equals the full `R`
/// per member and the loss equals the full loss, in f64 to rounding. The full
/// loss goes through the Jacobian-column route (n = 6 > in = 5), the subsets
/// through direct tangents (m = 2).
#[test]
fn directions_per_step_averages_exactly_to_the_full_r() {
    let ens = model(9);
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let (e, b, bg, n, m) = (3, 3, 1, 6, 2);
    let x = t3(rand_vec(&mut rng, e * b * IN, 1.5), e, b, IN);
    let y = t3(rand_vec(&mut rng, e * b * OUT, 1.0), e, b, OUT);
    let points = rand_vec(&mut rng, e * bg * IN, 1.5);
    let directions = rand_vec(&mut rng, e * bg * n * IN, 0.5);
    let differences = rand_vec(&mut rng, e * bg * n * OUT, 0.5);
    let w = 0.7;
    // `chosen[p]`: the neighbours point `p` (member-major) keeps.
    let batch = |chosen: &[Vec<usize>]| {
        let k = chosen[0].len();
        let mut d = Vec::new();
        let mut dy = Vec::new();
        for (p, keep) in chosen.iter().enumerate() {
            for &i in keep {
                let row = p * n + i;
                d.extend_from_slice(&directions[row * IN..(row + 1) * IN]);
                dy.extend_from_slice(&differences[row * OUT..(row + 1) * OUT]);
            }
        }
        LossBatch {
            x: x.clone(),
            y: y.clone(),
            neighbours: Some(NeighbourBatch {
                points: t3(points.clone(), e, bg, IN),
                directions: t3(d, e, bg * k, IN),
                differences: t3(dy, e, bg * k, OUT),
                k,
            }),
        }
    };
    let terms = |chosen: &[Vec<usize>]| {
        let t = ens.loss(&batch(chosen), w).unwrap();
        let r = t.derivative_loss.unwrap().to_vec1::<f64>().unwrap();
        (t.total.to_scalar::<f64>().unwrap(), r)
    };
    let all: Vec<usize> = (0..n).collect();
    let (full_total, full_r) = terms(&vec![all; e * bg]);

    let subs = subsets(n, m);
    assert_eq!(subs.len(), 15);
    let points_total = e * bg;
    let combos = subs.len().pow(points_total as u32);
    let (mut total_sum, mut r_sum) = (0.0, vec![0.0; e]);
    for c in 0..combos {
        let chosen: Vec<Vec<usize>> =
            (0..points_total).map(|p| subs[(c / subs.len().pow(p as u32)) % subs.len()].clone()).collect();
        let (t, r) = terms(&chosen);
        total_sum += t;
        r_sum.iter_mut().zip(&r).for_each(|(s, v)| *s += v);
    }
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
    let mean_total = total_sum / combos as f64;
    assert!(close(mean_total, full_total), "loss: mean of estimates {mean_total} vs full {full_total}");
    for (s, full) in r_sum.iter().zip(&full_r) {
        let mean = s / combos as f64;
        assert!(close(mean, *full), "R: mean of estimates {mean} vs full {full}");
    }
    // One subset alone is not the full R (the average above is not trivial).
    let (_, one) = terms(&vec![vec![0, 1]; points_total]);
    assert!(one.iter().zip(&full_r).all(|(a, b)| (a - b).abs() > 1e-6));
}
