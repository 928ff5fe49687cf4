//! Neighbour-table and sampling benchmarks (issue 6).
//!
//! `cargo bench -p ddppo-buffer --bench neighbours`
//!
//! 1. Builds the datasets (N = 10,000 rows of x = (s, a)): uniform random,
//!    momentum random-walk trajectories, and real replay data from
//!    random-policy episodes of Hopper (D 14), Ant (D 35) and Humanoid (D 62)
//!    on `ddppo-env`; writes each to `.cache/neighbour-bench/<name>.npy`.
//! 2. criterion: `NeighbourIndex::build` (auto method, build + query) on one
//!    thread and on all threads, the tree and GEMM methods forced on one
//!    thread, next to the brute-force baseline, plus sampling of 256-row
//!    batches.
//! 3. A summary in the same run: best-of-R wall times of the auto method
//!    (1 thread, all threads), the tree and GEMM methods forced (1 thread),
//!    brute force, and SciPy `cKDTree(X).query(X, k=n+1)` from
//!    `benches/scipy_neighbours.py` on the same `.npy` files, with ratios.
//!    The Python interpreter is `$DDPPO_BENCH_PYTHON`, else
//!    `.cache/venv-bench/bin/python` (numpy + scipy); without one the SciPy
//!    column says so.
//!
//! Environment knobs: `DDPPO_BENCH_SUMMARY_ONLY=1` skips criterion;
//! `DDPPO_BENCH_REPS` (default 3) sets R.
use std::hint::black_box;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use ddppo_buffer::{
    Batch, NeighbourIndex, NeighbourMethod, NeighbourOptions, ReplayBuffer, brute_force_neighbours, effective_dimension,
};
use ddppo_env::{Task, make};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const N: usize = 10_000;
const DIMS: [usize; 3] = [14, 35, 62];
const NEIGHBOURS: [usize; 2] = [5, 25];

struct Dataset {
    name: String,
    dim: usize,
    points: Vec<f32>,
}

fn uniform(dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..N * dim).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Momentum random walks, 1000-step episodes, column scales spread over
/// three decades (like positions, velocities and actions side by side).
fn random_walk(dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let scales: Vec<f32> = (0..dim).map(|_| 10f32.powf(rng.random_range(-2.0..1.0))).collect();
    let mut p = Vec::with_capacity(N * dim);
    let (mut x, mut v) = (vec![0f32; dim], vec![0f32; dim]);
    for r in 0..N {
        if r % 1000 == 0 {
            x.iter_mut().zip(&scales).for_each(|(xk, s)| *xk = rng.random_range(-0.1..0.1) * s);
            v.iter_mut().for_each(|vk| *vk = 0.0);
        }
        for k in 0..dim {
            v[k] = 0.95 * v[k] + 0.05 * scales[k] * rng.random_range(-1.0f32..1.0);
            x[k] += v[k];
        }
        p.extend_from_slice(&x);
    }
    p
}

/// The newest N transitions of random-policy episodes, x = (s, a) as f32.
fn replay(task: Task, seed: u64) -> Vec<f32> {
    let mut env = match make(task) {
        Ok(env) => env,
        Err(e) => {
            panic!("cannot build {task} for the real-data benchmark (run `cargo xtask setup`): {e}")
        }
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (low, high) = (env.action_low().to_vec(), env.action_high().to_vec());
    let mut p = Vec::with_capacity(N * (env.obs_dim() + env.act_dim()));
    let mut episode = 0u64;
    let mut obs = env.reset(seed);
    while p.len() < N * (env.obs_dim() + env.act_dim()) {
        let action: Vec<f64> = low.iter().zip(&high).map(|(l, h)| rng.random_range(*l..=*h)).collect();
        p.extend(obs.iter().chain(&action).map(|&v| v as f32));
        let step = env.step(&action).unwrap_or_else(|e| panic!("{task} step failed: {e}"));
        obs = step.obs;
        if step.terminated || step.truncated {
            episode += 1;
            obs = env.reset(seed + episode);
        }
    }
    p
}

fn datasets() -> Vec<Dataset> {
    let mut out = Vec::new();
    for &dim in &DIMS {
        out.push(Dataset { name: format!("uniform-d{dim}"), dim, points: uniform(dim, dim as u64) });
        out.push(Dataset { name: format!("walk-d{dim}"), dim, points: random_walk(dim, dim as u64) });
    }
    for (task, label) in [(Task::Hopper, "hopper"), (Task::Ant, "ant"), (Task::Humanoid, "humanoid")] {
        let dim = task.obs_dim() + task.act_dim();
        out.push(Dataset { name: format!("{label}-d{dim}"), dim, points: replay(task, 1) });
    }
    out
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Writes `points` as a C-ordered float32 .npy (format version 1.0).
fn write_npy(path: &Path, points: &[f32], dim: usize) -> std::io::Result<()> {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}", points.len() / dim, dim);
    // Magic (6) + version (2) + header length (2) + header, padded to 64 bytes, ending in '\n'.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&(header.len() as u16).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    for v in points {
        f.write_all(&v.to_le_bytes())?;
    }
    f.flush()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(p) => p,
        Err(e) => panic!("cannot build a {threads}-thread pool: {e}"),
    }
}

fn build(points: &[f32], dim: usize, n: usize) -> NeighbourIndex {
    build_with(points, dim, n, NeighbourMethod::Auto)
}

fn build_with(points: &[f32], dim: usize, n: usize, method: NeighbourMethod) -> NeighbourIndex {
    match NeighbourIndex::build_with(points, dim, n, &NeighbourOptions::default(), method) {
        Ok(ix) => ix,
        Err(e) => panic!("NeighbourIndex::build failed: {e}"),
    }
}

fn brute(points: &[f32], dim: usize, n: usize) -> Vec<u32> {
    match brute_force_neighbours(points, dim, n, &NeighbourOptions::default()) {
        Ok(t) => t,
        Err(e) => panic!("brute force failed: {e}"),
    }
}

fn best_of(reps: usize, mut f: impl FnMut()) -> Duration {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn criterion_benches(c: &mut Criterion, data: &[Dataset], single: &rayon::ThreadPool, all: &rayon::ThreadPool) {
    let mut g = c.benchmark_group("neighbours");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    for d in data {
        // Uniform data is the slow worst case (seconds per build): to keep the
        // whole bench near 10 minutes it gets the all-threads runs only; the
        // summary below still times it on one thread and by brute force.
        let uniform = d.name.starts_with("uniform");
        for &n in &NEIGHBOURS {
            for (threads, p) in [("1-thread", single), ("all-threads", all)] {
                if uniform && threads == "1-thread" {
                    continue;
                }
                let id = BenchmarkId::new(format!("auto/{threads}/n{n}"), &d.name);
                g.bench_function(id, |b| b.iter(|| p.install(|| black_box(build(&d.points, d.dim, n)))));
            }
            for (label, method) in [("tree", NeighbourMethod::Tree), ("gemm", NeighbourMethod::Gemm)] {
                if uniform && method == NeighbourMethod::Tree {
                    continue;
                }
                let id = BenchmarkId::new(format!("{label}/1-thread/n{n}"), &d.name);
                g.bench_function(id, |b| {
                    b.iter(|| single.install(|| black_box(build_with(&d.points, d.dim, n, method))))
                });
            }
        }
        if !uniform {
            // The baseline: exhaustive search, all threads, n = 5 (its cost barely depends on n).
            let id = BenchmarkId::new("brute-force/all-threads/n5", &d.name);
            g.bench_function(id, |b| b.iter(|| all.install(|| black_box(brute(&d.points, d.dim, 5)))));
        }
    }
    g.finish();

    let mut g = c.benchmark_group("replay");
    let (obs_dim, act_dim) = (17, 6);
    let mut buf = ReplayBuffer::new(obs_dim, act_dim, 1_000_000);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let rows = 100_000;
    let col =
        |w: usize, rng: &mut ChaCha8Rng| -> Vec<f32> { (0..rows * w).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let (o, a, r, o2) = (col(obs_dim, &mut rng), col(act_dim, &mut rng), col(1, &mut rng), col(obs_dim, &mut rng));
    if let Err(e) = buf.push_batch(&o, &a, &r, &o2, &vec![1.0; rows], &vec![0.0; rows]) {
        panic!("{e}");
    }
    let mut batch = Batch::new(256, obs_dim, act_dim);
    g.bench_function("sample_into/256-rows/obs17-act6/100k-rows", |b| b.iter(|| buf.sample_into(&mut rng, &mut batch)));
    let model = buf.clone();
    g.bench_function("sample_mixed/256-rows/real-ratio-0.05", |b| {
        b.iter(|| ddppo_buffer::sample_mixed(&buf, &model, 0.05, &mut rng, &mut batch))
    });
    g.finish();
}

fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("DDPPO_BENCH_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = workspace_root().join(".cache/venv-bench/bin/python");
    venv.exists().then_some(venv)
}

/// SciPy seconds per (dataset name, n, workers), from the script's output lines
/// `scipy <name> <n> <workers> <seconds>`.
fn scipy_times(dir: &Path, reps: usize) -> Result<Vec<(String, usize, usize, f64)>, String> {
    let py = python().ok_or("no Python with scipy: set DDPPO_BENCH_PYTHON or create .cache/venv-bench")?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/scipy_neighbours.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(dir)
        .arg(reps.to_string())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", py.display()))?;
    if !out.status.success() {
        return Err(format!("scipy script failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                ["scipy", name, n, w, s] => Some((name.to_string(), n.parse().ok()?, w.parse().ok()?, s.parse().ok()?)),
                _ => None,
            }
        })
        .collect())
}

fn summary(data: &[Dataset], dir: &Path, single: &rayon::ThreadPool, all: &rayon::ThreadPool, threads: usize) {
    let reps: usize = std::env::var("DDPPO_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let scipy = scipy_times(dir, reps);
    if let Err(e) = &scipy {
        println!("SciPy side skipped: {e}");
    }
    let scipy_of = |name: &str, n: usize, w: usize| -> Option<f64> {
        scipy.as_ref().ok()?.iter().find(|(s, sn, sw, _)| s == name && *sn == n && *sw == w).map(|t| t.3)
    };
    println!("\nN = {N}, best of {reps}, seconds (build + query of the full table); {threads} threads = all");
    println!(
        "{:<13} {:>2} {:>5} {:>4} | {:>8} {:>8} {:>8} {:>8} {:>6} | {:>8} {:>8} {:>6} | {:>4} {:>4} | {:>8}",
        "data",
        "n",
        "effD",
        "auto",
        "auto-1t",
        "tree-1t",
        "gemm-1t",
        "scipy-1t",
        "ratio",
        "auto-all",
        "scipy-all",
        "ratio",
        "fb-t",
        "fb-g",
        "brute-all"
    );
    for d in data {
        let brute_all = best_of(1, || {
            all.install(|| black_box(brute(&d.points, d.dim, 5)));
        });
        let reference = all.install(|| brute(&d.points, d.dim, 25));
        let eff = match effective_dimension(&d.points, d.dim, &NeighbourOptions::default()) {
            Ok(e) => e,
            Err(e) => panic!("{e}"),
        };
        for &n in &NEIGHBOURS {
            let time = |method: NeighbourMethod, p: &rayon::ThreadPool| {
                best_of(reps, || {
                    p.install(|| black_box(build_with(&d.points, d.dim, n, method)));
                })
            };
            let t1 = time(NeighbourMethod::Auto, single);
            let tt = time(NeighbourMethod::Tree, single);
            let tg = time(NeighbourMethod::Gemm, single);
            let ta = time(NeighbourMethod::Auto, all);
            // The summary only reports exact tables: check every method against brute force.
            let mut fb = Vec::new();
            let mut chosen = NeighbourMethod::Auto;
            for method in [NeighbourMethod::Auto, NeighbourMethod::Tree, NeighbourMethod::Gemm] {
                let ix = all.install(|| build_with(&d.points, d.dim, n, method));
                let same = (0..N).all(|i| ix.neighbours(i) == &reference[i * 25..i * 25 + n]);
                assert!(same, "{}: {method:?} table differs from brute force", d.name);
                fb.push(ix.exact_fallbacks());
                if method == NeighbourMethod::Auto {
                    chosen = ix.method();
                }
            }
            let s1 = scipy_of(&d.name, n, 1);
            let sa = scipy_of(&d.name, n, threads);
            let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
            let ratio =
                |s: Option<f64>, k: Duration| s.map_or("-".to_string(), |s| format!("{:.2}x", s / k.as_secs_f64()));
            println!(
                "{:<13} {:>2} {:>5.1} {:>4} | {:>8.4} {:>8.4} {:>8.4} {:>8} {:>6} | {:>8.4} {:>8} {:>6} | {:>4} {:>4} | {:>8.3}",
                d.name,
                n,
                eff,
                if chosen == NeighbourMethod::Tree { "tree" } else { "gemm" },
                t1.as_secs_f64(),
                tt.as_secs_f64(),
                tg.as_secs_f64(),
                fmt(s1),
                ratio(s1, t1),
                ta.as_secs_f64(),
                fmt(sa),
                ratio(sa, ta),
                fb[1],
                fb[2],
                brute_all.as_secs_f64(),
            );
        }
    }
    println!(
        "effD = effective_dimension, the local intrinsic dimension estimate (the auto rule's input); auto = the method it chose."
    );
    println!(
        "ratio = SciPy time / auto time (above 1: ours faster); fb-t / fb-g = rows the tree / GEMM could not certify."
    );
}

fn main() {
    let data = datasets();
    let dir = workspace_root().join(".cache/neighbour-bench");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("cannot create {}: {e}", dir.display());
    }
    for d in &data {
        let path = dir.join(format!("{}.npy", d.name));
        if let Err(e) = write_npy(&path, &d.points, d.dim) {
            panic!("cannot write {}: {e}", path.display());
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (single, all) = (pool(1), pool(threads));
    if std::env::var_os("DDPPO_BENCH_SUMMARY_ONLY").is_none() {
        let mut c = Criterion::default().configure_from_args();
        criterion_benches(&mut c, &data, &single, &all);
        c.final_summary();
    }
    summary(&data, &dir, &single, &all, threads);
}
