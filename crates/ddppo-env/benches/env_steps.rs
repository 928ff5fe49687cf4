//! Env steps per second for each MuJoCo task, next to bare `mj_step` x
//! frame_skip on the same model in the same run, and the evaluation
//! runner's steps per second with 1 and 2 workers.
//!
//! Both variants of a task start from the same reset state, apply the same
//! cycle of random actions, and return to the start state every 1000 steps,
//! so they simulate the same kind of states (terminations are ignored: the
//! env keeps stepping, like the bare loop). At the end the bench prints the
//! env's overhead over the bare loop per task (the aim is under 5%), taken
//! from `step/paired/*`, which times the two in alternating 50-step blocks
//! so that both see the same load on a shared machine.
//!
//! Run: `cargo bench -p ddppo-env --bench env_steps`
use criterion::{Criterion, Throughput};
use ddppo_env::{Env, EnvFactory, MujocoModel, Task, evaluate_episodes};
use mujoco_rs::prelude::MjData;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const TASKS: [Task; 6] =
    [Task::InvertedPendulum, Task::Hopper, Task::Walker2d, Task::HalfCheetah, Task::Ant, Task::Humanoid];
const EPISODE: usize = 1000;

/// Total time and steps of each (task, variant), over everything criterion ran.
type Times = BTreeMap<(String, &'static str), (Duration, u64)>;
static TIMES: Mutex<Times> = Mutex::new(BTreeMap::new());

fn record(task: Task, variant: &'static str, elapsed: Duration, iters: u64) {
    let mut times = TIMES.lock().unwrap();
    let entry = times.entry((task.name().to_string(), variant)).or_default();
    entry.0 += elapsed;
    entry.1 += iters;
}

fn actions(task: Task) -> Vec<Vec<f64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let env = MujocoModel::load(task).unwrap().make_env();
    let (low, high) = (env.action_low().to_vec(), env.action_high().to_vec());
    (0..EPISODE).map(|_| low.iter().zip(&high).map(|(l, h)| rng.random_range(*l..*h)).collect()).collect()
}

fn bench_steps(c: &mut Criterion) {
    let mut group = c.benchmark_group("step");
    group.throughput(Throughput::Elements(1));
    for task in TASKS {
        let model = MujocoModel::load(task).unwrap();
        let acts = actions(task);
        let mut env = model.make_env();
        env.reset(0);
        let (qpos, qvel) = env.state();

        group.bench_function(format!("env/{task}"), |b| {
            b.iter_custom(|iters| {
                env.set_state(&qpos, &qvel).unwrap();
                let start = Instant::now();
                for i in 0..iters as usize {
                    if i % EPISODE == EPISODE - 1 {
                        env.set_state(&qpos, &qvel).unwrap();
                    }
                    std::hint::black_box(env.step(&acts[i % EPISODE]).unwrap());
                }
                let elapsed = start.elapsed();
                record(task, "env", elapsed, iters);
                elapsed
            })
        });

        let mut data = MjData::new(model.model().clone());
        let skip = model.frame_skip();
        let set = |data: &mut MjData<_>| {
            data.qpos_mut().copy_from_slice(&qpos);
            data.qvel_mut().copy_from_slice(&qvel);
            data.forward();
        };
        let raw_step = |data: &mut MjData<_>, action: &[f64]| {
            data.ctrl_mut().copy_from_slice(action);
            for _ in 0..skip {
                data.step();
            }
            std::hint::black_box(data.qpos()[0]);
        };

        // The overhead ratio: env and bare loop timed in alternating blocks
        // of 50 steps, so both see the same machine load (this box is shared).
        group.bench_function(format!("paired/{task}"), |b| {
            b.iter_custom(|iters| {
                env.set_state(&qpos, &qvel).unwrap();
                set(&mut data);
                let (mut env_time, mut raw_time) = (Duration::ZERO, Duration::ZERO);
                let mut i = 0;
                while i < iters as usize {
                    let block = (iters as usize - i).min(50);
                    let start = Instant::now();
                    for k in i..i + block {
                        if k % EPISODE == EPISODE - 1 {
                            env.set_state(&qpos, &qvel).unwrap();
                        }
                        std::hint::black_box(env.step(&acts[k % EPISODE]).unwrap());
                    }
                    env_time += start.elapsed();
                    let start = Instant::now();
                    for k in i..i + block {
                        if k % EPISODE == EPISODE - 1 {
                            set(&mut data);
                        }
                        raw_step(&mut data, &acts[k % EPISODE]);
                    }
                    raw_time += start.elapsed();
                    i += block;
                }
                record(task, "paired env", env_time, iters);
                record(task, "paired raw", raw_time, iters);
                env_time + raw_time
            })
        });
        group.bench_function(format!("raw_mj_step/{task}"), |b| {
            b.iter_custom(|iters| {
                set(&mut data);
                let start = Instant::now();
                for i in 0..iters as usize {
                    if i % EPISODE == EPISODE - 1 {
                        set(&mut data);
                    }
                    raw_step(&mut data, &acts[i % EPISODE]);
                }
                let elapsed = start.elapsed();
                record(task, "raw", elapsed, iters);
                elapsed
            })
        });
    }
    group.finish();
}

fn bench_runner(c: &mut Criterion) {
    // HalfCheetah never terminates: every episode is exactly 1000 steps.
    let episodes = 4;
    let factory = EnvFactory::new(Task::HalfCheetah).unwrap();
    let policy = |obs: &[f64]| (0..6).map(|i| (obs[i] * 3.0).sin()).collect::<Vec<f64>>();
    let mut group = c.benchmark_group("evaluate");
    group.throughput(Throughput::Elements((episodes * EPISODE) as u64));
    group.sample_size(10);
    for workers in [1, 2] {
        group.bench_function(format!("half-cheetah/{workers}-workers"), |b| {
            b.iter(|| evaluate_episodes(&factory, &policy, episodes, 0, workers).unwrap())
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .configure_from_args();
    bench_steps(&mut c);
    bench_runner(&mut c);
    c.final_summary();

    let times = TIMES.lock().unwrap();
    println!("\nenv step vs bare mj_step x frame_skip (same model, same run; overhead from the paired blocks):");
    println!(
        "{:<18} {:>12} {:>12} {:>15} {:>15} {:>9}",
        "task", "env steps/s", "raw steps/s", "paired env/s", "paired raw/s", "overhead"
    );
    for task in TASKS {
        let rate = |variant| times.get(&(task.name().to_string(), variant)).map(|(d, n)| *n as f64 / d.as_secs_f64());
        if let (Some(env), Some(raw), Some(penv), Some(praw)) =
            (rate("env"), rate("raw"), rate("paired env"), rate("paired raw"))
        {
            println!(
                "{:<18} {:>12.0} {:>12.0} {:>15.0} {:>15.0} {:>8.1}%",
                task.name(),
                env,
                raw,
                penv,
                praw,
                (praw / penv - 1.0) * 100.0
            );
        }
    }
}
