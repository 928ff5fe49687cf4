//! One ensemble training step at MBPO size (E = 7, in 35, out 28 + 28, batch 256,
//! n = 5): NLL only, NLL + the tangent directional-derivative loss, and as the
//! baseline in the same run the same loss through the full Jacobian (35 tangent
//! directions, the reference's method expressed with tangents); plus a model
//! rollout step of 100,000 rows; and the policy update's forward and backward pass
//! through the model's mean for 256 rows, on the ensemble and on its frozen view.
//! Compare with `shared/bench/torch_ensemble_step.py`.
use std::hint::black_box;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use ddppo_models::{EnsembleConfig, LossBatch, ModelOptimizer, NeighbourBatch, ProbabilisticEnsemble};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const E: usize = 7;
const B: usize = 256;
const N: usize = 5;
const OBS: usize = 27;
const ACT: usize = 8;
const IN: usize = OBS + ACT;
const OUT: usize = 1 + OBS;

fn randn(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn bench(c: &mut Criterion) {
    // One thread, as the PyTorch baseline (`torch_ensemble_step.py 1 ...`). candle's
    // CPU pool reads RAYON_NUM_THREADS when first used; its spinning workers also do
    // badly on a loaded 2-core machine.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: set before any candle work, while this process runs one thread.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    ddppo_models::tune_allocator();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let ens =
        ProbabilisticEnsemble::new(OBS, ACT, &EnsembleConfig::default(), &Device::Cpu, DType::F32, &mut rng).unwrap();
    let mut opt = ModelOptimizer::new(&ens).unwrap();
    let x = randn(&mut rng, &[E, B, IN]);
    let y = randn(&mut rng, &[E, B, OUT]);
    let xg = randn(&mut rng, &[E, B, IN]);
    let t0 = randn(&mut rng, &[E, B * N, IN]);
    let dy = randn(&mut rng, &[E, B * N, OUT]);
    let nll_batch = LossBatch { x: x.clone(), y: y.clone(), neighbours: None };
    let grad_batch = LossBatch {
        x: x.clone(),
        y: y.clone(),
        neighbours: Some(NeighbourBatch { points: xg.clone(), directions: t0.clone(), differences: dy.clone(), k: N }),
    };

    let mut g = c.benchmark_group("ensemble_step_E7_B256");
    g.sample_size(20);
    g.bench_function("nll", |b| b.iter(|| black_box(opt.step(&ens, &nll_batch, 0.0).unwrap())));
    g.bench_function("nll+grad_loss_tangents_n5", |b| b.iter(|| black_box(opt.step(&ens, &grad_batch, 1.0).unwrap())));
    // Baseline: J·v through the full Jacobian, 35 unit tangent directions per point,
    // then contracted with the n = 5 directions.
    let eye: Vec<f32> = (0..B).flat_map(|_| (0..IN * IN).map(|i| if i / IN == i % IN { 1.0 } else { 0.0 })).collect();
    let eye = Tensor::from_vec(eye, (1, B * IN, IN), &Device::Cpu)
        .unwrap()
        .broadcast_as((E, B * IN, IN))
        .unwrap()
        .contiguous()
        .unwrap();
    let v = t0.reshape((E, B, N, IN)).unwrap().transpose(2, 3).unwrap().contiguous().unwrap();
    let dy4 = dy.reshape((E, B, N, OUT)).unwrap();
    g.sample_size(10);
    g.bench_function("nll+grad_loss_full_jacobian_baseline", |b| {
        b.iter(|| {
            let terms = ens.loss(&nll_batch, 0.0).unwrap();
            let jac = ens.jvp(&xg, &eye, IN).unwrap(); // E x (B*IN) x OUT: column i of J per point
            let jac = jac.reshape((E, B, IN, OUT)).unwrap().transpose(2, 3).unwrap().contiguous().unwrap();
            let jv = jac.matmul(&v).unwrap().transpose(2, 3).unwrap(); // E x B x N x OUT
            let r = (jv - &dy4).unwrap().sqr().unwrap().mean_all().unwrap();
            let total = (terms.total + r).unwrap();
            black_box(opt.apply(&total).unwrap())
        })
    });
    g.finish();

    // The policy update (equation 11) back-propagates through the gradient model's
    // mean into (s, a) only: the ensemble itself, or its frozen view (no weight
    // gradients formed). B = 256 rows spread over the elites.
    let mut g = c.benchmark_group("policy_update_mean_fwd_bwd_B256");
    g.sample_size(20);
    let members = ens.draw_elites(B, &mut rng);
    let s = candle_core::Var::from_tensor(&randn(&mut rng, &[B, OBS])).unwrap();
    let a = candle_core::Var::from_tensor(&randn(&mut rng, &[B, ACT])).unwrap();
    let frozen = ens.frozen();
    for (name, model) in [("ensemble", &ens), ("frozen_view", &frozen)] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let m = model.mean(s.as_tensor(), a.as_tensor(), &members).unwrap();
                let loss = (m.reward.sum_all().unwrap() + m.next_obs.sum_all().unwrap()).unwrap();
                let grads = loss.backward().unwrap();
                black_box(grads.get(a.as_tensor()).unwrap().dims().len())
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("rollout");
    g.sample_size(10);
    let rows = 100_000;
    let obs = randn(&mut rng, &[rows, OBS]);
    let act = randn(&mut rng, &[rows, ACT]);
    g.bench_function("sample_100k_rows", |b| {
        b.iter(|| {
            let members = ens.draw_elites(rows, &mut rng);
            black_box(ens.sample(&obs, &act, &members, &mut rng).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
