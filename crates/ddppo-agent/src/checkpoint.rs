//! Checkpoints: everything a run's future depends on, so that a resumed run
//! continues exactly as the uninterrupted one would have (on the CPU, bit for
//! bit).
//!
//! One checkpoint is a directory:
//!
//! | file | holds |
//! |---|---|
//! | `state.json` | config, counters, env state and observation, episode bookkeeping, metric accumulators, random streams (seed, stream, word position), optimiser step counts |
//! | `networks.safetensors` | policy, critic, target critic, temperature, and the Adam moments of all five optimisers |
//! | `prediction.safetensors`, `gradient.safetensors` | the ensembles (weights, scaler, elites) |
//! | `env_buffer.bin`, `model_buffer.bin` | `D_env` and `D_model` |
//! | `jacobian_probe.safetensors` | the Jacobian diagnostics' held-out states, true Jacobians and directions (once drawn) |
//! | `MANIFEST.json` | size and FNV-1a 64 checksum of every other file; written last |
//!
//! [`Checkpoints`] keeps them in `RUN/checkpoints/step-NNNNNNNNNN`: a new one
//! is written under a temporary name and renamed when complete; the previous
//! one is kept, older ones are removed. Loading verifies the manifest before
//! anything is read, so a truncated or corrupted file is a clear error.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use ddppo_buffer::{Fnv1a, ReplayBuffer};
use ddppo_env::EnvFactory;
use ddppo_models::OptimizerState;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::agent::{Agent, AgentRngs, Mean, ModelStats, PhaseTimes};
use crate::config::{AgentConfig, IntoValidConfig};
use crate::jacobian_error::JacobianProbe;
use crate::nn::{Adam, sorted_vars};
use crate::sac::GaussianPolicy;
use crate::{Error, Result};

/// The format tag in `state.json` and `MANIFEST.json`.
pub const FORMAT: &str = "ddppo-checkpoint/1";
const STATE: &str = "state.json";
const MANIFEST: &str = "MANIFEST.json";
const NETWORKS: &str = "networks.safetensors";
const PREDICTION: &str = "prediction.safetensors";
const GRADIENT: &str = "gradient.safetensors";
const ENV_BUFFER: &str = "env_buffer.bin";
const MODEL_BUFFER: &str = "model_buffer.bin";
/// The held-out states of the Jacobian diagnostics, once drawn.
const JACOBIAN_PROBE: &str = "jacobian_probe.safetensors";

fn ck(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.display().to_string(), reason: reason.into() }
}

fn io(path: &Path, e: std::io::Error) -> Error {
    ck(path, e.to_string())
}

/// A `ChaCha8Rng` as seed, stream and word position.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RngState {
    seed: String,
    stream: u64,
    word_pos: String,
}

impl RngState {
    fn of(r: &ChaCha8Rng) -> Self {
        let seed = r.get_seed().iter().map(|b| format!("{b:02x}")).collect();
        Self { seed, stream: r.get_stream(), word_pos: r.get_word_pos().to_string() }
    }
    fn rng(&self) -> std::result::Result<ChaCha8Rng, String> {
        if self.seed.len() != 64 {
            return Err(format!("random-stream seed `{}` is not 64 hex digits", self.seed));
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b =
                u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16).map_err(|e| format!("random-stream seed: {e}"))?;
        }
        let pos: u128 = self.word_pos.parse().map_err(|e| format!("random-stream position: {e}"))?;
        let mut r = ChaCha8Rng::from_seed(seed);
        r.set_stream(self.stream);
        r.set_word_pos(pos);
        Ok(r)
    }
}

/// `state.json`.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    format: String,
    /// The run's config as TOML.
    config: String,
    env_steps: usize,
    critic_updates: u64,
    policy_updates: u64,
    model_trainings: u64,
    #[serde(default)]
    diverged_episodes: u64,
    rollout_length: usize,
    obs: Vec<f64>,
    env_state: Vec<f64>,
    episode_return: f64,
    last_train_return: Option<f64>,
    critic_loss: (f64, usize),
    policy_loss: (f64, usize),
    model_loss: Option<f64>,
    model_holdout_mse: Option<f64>,
    grad_loss: Option<f64>,
    phase_s: PhaseTimes,
    wall_s: f64,
    rngs: BTreeMap<String, RngState>,
    /// Adam step counts (`prediction`/`gradient` absent before their first training).
    optimizer_steps: BTreeMap<String, u64>,
    /// The env step is taken, the updates after it are not (an interrupted
    /// model training).
    #[serde(default)]
    mid_step: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileSum {
    bytes: u64,
    fnv1a64: String,
}

/// `MANIFEST.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    env_steps: usize,
    files: BTreeMap<String, FileSum>,
}

/// FNV-1a 64 of a file, and its length.
fn checksum(path: &Path) -> Result<(u64, u64)> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path).map_err(|e| io(path, e))?);
    let mut h = Fnv1a::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = r.read(&mut buf).map_err(|e| io(path, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((h.value(), n))
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).map_err(|e| io(path, e))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| io(path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| io(path, e))
}

fn optimizer_tensors(map: &mut BTreeMap<String, Tensor>, name: &str, m: &[Tensor], v: &[Tensor]) {
    for (i, (m, v)) in m.iter().zip(v).enumerate() {
        map.insert(format!("opt/{name}/m/{i}"), m.clone());
        map.insert(format!("opt/{name}/v/{i}"), v.clone());
    }
}

fn varmap_tensors(map: &mut BTreeMap<String, Tensor>, prefix: &str, vm: &VarMap) {
    for (name, var) in sorted_vars(vm) {
        map.insert(format!("{prefix}/{name}"), var.as_tensor().clone());
    }
}

impl Agent {
    /// Writes this agent's complete state into the existing, empty directory
    /// `dir` (see the module docs); `MANIFEST.json` is written last.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let mut files = Vec::new();
        // Networks and optimiser moments.
        let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        varmap_tensors(&mut tensors, "policy", self.policy.varmap());
        varmap_tensors(&mut tensors, "critic", self.critic.varmap());
        varmap_tensors(&mut tensors, "critic_target", self.critic.target_varmap());
        tensors.insert("temperature/log_alpha".into(), self.temperature.var().as_tensor().clone());
        let mut steps = BTreeMap::new();
        for (name, opt) in [("policy", &self.policy_opt), ("critic", &self.critic_opt), ("alpha", &self.alpha_opt)] {
            let (m, v) = opt.moments();
            optimizer_tensors(&mut tensors, name, m, v);
            steps.insert(name.to_string(), opt.step);
        }
        if let Some(models) = &self.models {
            let mut ensembles = vec![("prediction", PREDICTION, &models.prediction)];
            if let Some(g) = &models.gradient {
                ensembles.push(("gradient", GRADIENT, g));
            }
            for (name, file, e) in ensembles {
                let path = dir.join(file);
                e.ensemble().save(&path)?;
                sync_file(&path)?;
                files.push(file);
                if let Some(s) = e.optimizer_state() {
                    optimizer_tensors(&mut tensors, name, &s.m, &s.v);
                    steps.insert(name.to_string(), s.step);
                }
            }
        }
        if let Some(probe) = &self.jacobian_probe {
            let path = dir.join(JACOBIAN_PROBE);
            probe.save(&path)?;
            sync_file(&path)?;
            files.push(JACOBIAN_PROBE);
        }
        let path = dir.join(NETWORKS);
        let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        candle_core::safetensors::save(&map, &path).map_err(|e| ck(&path, e.to_string()))?;
        sync_file(&path)?;
        files.push(NETWORKS);
        // Buffers (each written to a temporary name, synced and renamed).
        self.env_buffer.save(&dir.join(ENV_BUFFER))?;
        self.model_buffer.save(&dir.join(MODEL_BUFFER))?;
        files.extend([ENV_BUFFER, MODEL_BUFFER]);
        // Everything else.
        let rngs = [
            ("env", &self.rngs.env),
            ("act", &self.rngs.act),
            ("update", &self.rngs.update),
            ("model", &self.rngs.model),
        ]
        .into_iter()
        .map(|(k, r)| (k.to_string(), RngState::of(r)))
        .collect();
        let state = State {
            format: FORMAT.into(),
            config: self.cfg.to_toml()?,
            env_steps: self.env_steps,
            critic_updates: self.critic_updates,
            policy_updates: self.policy_updates,
            model_trainings: self.model_trainings,
            diverged_episodes: self.diverged_episodes,
            rollout_length: self.rollout_length,
            obs: self.obs.clone(),
            env_state: self.env.save_state(),
            episode_return: self.episode_return,
            last_train_return: self.last_train_return,
            critic_loss: (self.critic_loss.sum, self.critic_loss.n),
            policy_loss: (self.policy_loss.sum, self.policy_loss.n),
            model_loss: self.model_stats.loss,
            model_holdout_mse: self.model_stats.holdout,
            grad_loss: self.model_stats.grad,
            phase_s: self.times,
            wall_s: self.started.elapsed().as_secs_f64(),
            rngs,
            optimizer_steps: steps,
            mid_step: self.mid_step,
        };
        let path = dir.join(STATE);
        let json = serde_json::to_vec_pretty(&state).map_err(|e| ck(&path, e.to_string()))?;
        write_synced(&path, &json)?;
        files.push(STATE);
        // The manifest, last: a directory without one is incomplete.
        let mut sums = BTreeMap::new();
        for f in files {
            let (h, n) = checksum(&dir.join(f))?;
            sums.insert(f.to_string(), FileSum { bytes: n, fnv1a64: format!("{h:016x}") });
        }
        let manifest = Manifest { format: FORMAT.into(), env_steps: self.env_steps, files: sums };
        let path = dir.join(MANIFEST);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| ck(&path, e.to_string()))?;
        write_synced(&path, &json)?;
        sync_file(dir)
    }

    /// Rebuilds the agent of `cfg` on `device` and loads the checkpoint in
    /// `dir` into it. Every file is checked against the manifest first and
    /// the checkpoint's config must equal `cfg`; any problem is an
    /// [`Error::Checkpoint`] naming the file.
    pub fn from_checkpoint(cfg: impl IntoValidConfig, device: Device, dir: &Path) -> Result<Self> {
        let cfg = cfg.into_valid()?;
        verify(dir, None)?;
        let state = read_state(dir, &cfg)?;
        let mut agent = Agent::with_device(cfg, device.clone())?;
        let path = dir.join(NETWORKS);
        let map = candle_core::safetensors::load(&path, &device).map_err(|e| ck(&path, e.to_string()))?;
        let get = |name: &str| map.get(name).cloned().ok_or_else(|| ck(&path, format!("no tensor `{name}`")));
        let set = |prefix: &str, vm: &VarMap| -> Result<()> {
            for (name, var) in sorted_vars(vm) {
                set_var(&path, &var, &get(&format!("{prefix}/{name}"))?)?;
            }
            Ok(())
        };
        set("policy", agent.policy.varmap())?;
        set("critic", agent.critic.varmap())?;
        set("critic_target", agent.critic.target_varmap())?;
        set_var(&path, agent.temperature.var(), &get("temperature/log_alpha")?)?;
        let steps = &state.optimizer_steps;
        let moments = |name: &str, count: usize| -> Result<(Vec<Tensor>, Vec<Tensor>)> {
            let m = (0..count).map(|i| get(&format!("opt/{name}/m/{i}"))).collect::<Result<Vec<_>>>()?;
            let v = (0..count).map(|i| get(&format!("opt/{name}/v/{i}"))).collect::<Result<Vec<_>>>()?;
            Ok((m, v))
        };
        let step_of = |name: &str| -> Result<u64> {
            steps
                .get(name)
                .copied()
                .ok_or_else(|| ck(&dir.join(STATE), format!("no optimiser step count for `{name}`")))
        };
        let restore = |opt: &mut Adam, name: &str| -> Result<()> {
            let (m, v) = moments(name, opt.vars().len())?;
            opt.restore(step_of(name)?, m, v).map_err(|e| ck(&path, e.to_string()))
        };
        restore(&mut agent.policy_opt, "policy")?;
        restore(&mut agent.critic_opt, "critic")?;
        restore(&mut agent.alpha_opt, "alpha")?;
        if let Some(models) = agent.models.as_mut() {
            let mut ensembles = vec![("prediction", PREDICTION, &mut models.prediction)];
            if let Some(g) = models.gradient.as_mut() {
                ensembles.push(("gradient", GRADIENT, g));
            }
            for (name, file, e) in ensembles {
                let epath = dir.join(file);
                if !epath.exists() {
                    return Err(ck(&epath, "missing"));
                }
                e.ensemble_mut().load(&epath)?;
                let opt = match steps.get(name) {
                    Some(&step) => {
                        let prefix = format!("opt/{name}/m/");
                        let count = map.keys().filter(|k| k.starts_with(&prefix)).count();
                        let (m, v) = moments(name, count)?;
                        Some(OptimizerState { step, m, v })
                    }
                    None => None,
                };
                e.restore_optimizer_state(opt).map_err(|err| ck(&path, err.to_string()))?;
            }
        }
        // Checkpoints written before the diagnostics existed have no probe;
        // it is drawn again (from its own seeded stream) when needed.
        let probe = dir.join(JACOBIAN_PROBE);
        if probe.exists() {
            agent.jacobian_probe = Some(JacobianProbe::load(&probe, agent.env.obs_dim(), agent.env.act_dim())?);
        }
        agent.env_buffer = load_buffer(&dir.join(ENV_BUFFER), &agent.env_buffer)?;
        agent.model_buffer = load_buffer(&dir.join(MODEL_BUFFER), &agent.model_buffer)?;
        let spath = dir.join(STATE);
        agent.env.restore_state(&state.env_state).map_err(|e| ck(&spath, e.to_string()))?;
        if state.obs.len() != agent.env.obs_dim() {
            return Err(ck(
                &spath,
                format!("observation has {} values, the env {}", state.obs.len(), agent.env.obs_dim()),
            ));
        }
        let rng = |k: &str| -> Result<ChaCha8Rng> {
            let s = state.rngs.get(k).ok_or_else(|| ck(&spath, format!("no random stream `{k}`")))?;
            s.rng().map_err(|e| ck(&spath, e))
        };
        agent.rngs = AgentRngs { env: rng("env")?, act: rng("act")?, update: rng("update")?, model: rng("model")? };
        agent.obs = state.obs;
        agent.episode_return = state.episode_return;
        agent.last_train_return = state.last_train_return;
        agent.env_steps = state.env_steps;
        agent.critic_updates = state.critic_updates;
        agent.policy_updates = state.policy_updates;
        agent.model_trainings = state.model_trainings;
        agent.diverged_episodes = state.diverged_episodes;
        agent.rollout_length = state.rollout_length;
        agent.critic_loss = Mean { sum: state.critic_loss.0, n: state.critic_loss.1 };
        agent.policy_loss = Mean { sum: state.policy_loss.0, n: state.policy_loss.1 };
        agent.model_stats =
            ModelStats { loss: state.model_loss, holdout: state.model_holdout_mse, grad: state.grad_loss };
        agent.times = state.phase_s;
        let now = Instant::now();
        agent.started = now.checked_sub(Duration::from_secs_f64(state.wall_s.max(0.0))).unwrap_or(now);
        agent.snapshot = None;
        agent.mid_step = state.mid_step;
        Ok(agent)
    }
}

fn set_var(path: &Path, var: &Var, value: &Tensor) -> Result<()> {
    if value.dims() != var.dims() {
        return Err(ck(path, format!("a tensor has shape {:?}, the network {:?}", value.dims(), var.dims())));
    }
    var.set(&value.to_dtype(var.dtype())?).map_err(|e| ck(path, e.to_string()))
}

fn load_buffer(path: &Path, like: &ReplayBuffer) -> Result<ReplayBuffer> {
    let b = ReplayBuffer::load(path)?;
    if (b.obs_dim(), b.act_dim()) != (like.obs_dim(), like.act_dim()) {
        return Err(ck(
            path,
            format!(
                "buffer rows are ({}, {}) wide, the env needs ({}, {})",
                b.obs_dim(),
                b.act_dim(),
                like.obs_dim(),
                like.act_dim()
            ),
        ));
    }
    Ok(b)
}

fn read_state(dir: &Path, cfg: &AgentConfig) -> Result<State> {
    let path = dir.join(STATE);
    let bytes = fs::read(&path).map_err(|e| io(&path, e))?;
    let state: State = serde_json::from_slice(&bytes).map_err(|e| ck(&path, format!("unreadable: {e}")))?;
    if state.format != FORMAT {
        return Err(ck(&path, format!("format `{}` is not `{FORMAT}`", state.format)));
    }
    let saved: AgentConfig =
        toml::from_str(&state.config).map_err(|e| ck(&path, format!("its config does not parse: {}", e.message())))?;
    if &saved != cfg {
        let keys = saved.differing_keys(cfg)?.join(", ");
        return Err(ck(&path, format!("it was written by a run with a different config (differing keys: {keys})")));
    }
    Ok(state)
}

/// Checks that `dir` holds a complete checkpoint whose files match their
/// manifest entries (all of them, or only those in `only`).
fn verify(dir: &Path, only: Option<&[&str]>) -> Result<Manifest> {
    if !dir.is_dir() {
        return Err(ck(dir, "not a directory"));
    }
    let path = dir.join(MANIFEST);
    let bytes = fs::read(&path).map_err(|_| ck(dir, "incomplete (no MANIFEST.json)"))?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| ck(&path, format!("unreadable manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(ck(&path, format!("format `{}` is not `{FORMAT}`", manifest.format)));
    }
    for (name, sum) in &manifest.files {
        if only.is_some_and(|o| !o.contains(&name.as_str())) {
            continue;
        }
        let file = dir.join(name);
        let len = fs::metadata(&file).map_err(|_| ck(&file, "missing"))?.len();
        if len != sum.bytes {
            return Err(ck(&file, format!("truncated or altered: {len} bytes, the manifest says {}", sum.bytes)));
        }
        let (h, _) = checksum(&file)?;
        if format!("{h:016x}") != sum.fnv1a64 {
            return Err(ck(&file, "corrupt: its checksum does not match the manifest"));
        }
    }
    Ok(manifest)
}

/// The policy of the checkpoint in `dir` (for evaluation without loading the
/// buffers and models); `cfg` must be the run's config.
pub fn load_policy(cfg: &AgentConfig, device: &Device, dir: &Path) -> Result<(GaussianPolicy, usize)> {
    let manifest = verify(dir, Some(&[STATE, NETWORKS]))?;
    read_state(dir, cfg)?;
    let env = EnvFactory::new(cfg.task()?)?.make()?;
    let mut init = ChaCha8Rng::seed_from_u64(cfg.seed);
    let policy = GaussianPolicy::new(
        env.obs_dim(),
        env.action_low(),
        env.action_high(),
        &cfg.hidden,
        DType::F32,
        device,
        &mut init,
    )?;
    let path = dir.join(NETWORKS);
    let map = candle_core::safetensors::load(&path, device).map_err(|e| ck(&path, e.to_string()))?;
    for (name, var) in sorted_vars(policy.varmap()) {
        let t = map.get(&format!("policy/{name}")).ok_or_else(|| ck(&path, format!("no tensor `policy/{name}`")))?;
        set_var(&path, &var, t)?;
    }
    Ok((policy, manifest.env_steps))
}

/// The checkpoints of a run: `RUN/checkpoints/step-NNNNNNNNNN`, newest two kept.
#[derive(Clone, Debug)]
pub struct Checkpoints {
    root: PathBuf,
    keep: usize,
}

impl Checkpoints {
    /// The checkpoints of the run directory `run_dir`.
    pub fn new(run_dir: &Path) -> Self {
        Self { root: run_dir.join("checkpoints"), keep: 2 }
    }

    /// `RUN/checkpoints`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes a checkpoint of `agent` under a temporary name, renames it to
    /// `step-N` when complete, then removes all but the newest two (and any
    /// incomplete leftovers of an interrupted write). Returns its path.
    pub fn save(&self, agent: &Agent) -> Result<PathBuf> {
        fs::create_dir_all(&self.root).map_err(|e| io(&self.root, e))?;
        let name = format!("step-{:010}", agent.env_steps);
        let tmp = self.root.join(format!(".tmp-{name}"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        fs::create_dir(&tmp).map_err(|e| io(&tmp, e))?;
        if let Err(e) = agent.save_checkpoint(&tmp) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let done = self.root.join(&name);
        if done.exists() {
            fs::remove_dir_all(&done).map_err(|e| io(&done, e))?;
        }
        fs::rename(&tmp, &done).map_err(|e| io(&done, e))?;
        sync_file(&self.root)?;
        let all = self.list()?;
        for (_, old) in all.iter().rev().skip(self.keep) {
            fs::remove_dir_all(old).map_err(|e| io(old, e))?;
        }
        for entry in fs::read_dir(&self.root).map_err(|e| io(&self.root, e))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        Ok(done)
    }

    /// Complete (renamed) checkpoints, oldest first, with their env steps.
    pub fn list(&self) -> Result<Vec<(usize, PathBuf)>> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io(&self.root, e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) {
                out.push((step, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The newest complete checkpoint, if any.
    pub fn newest(&self) -> Result<Option<(usize, PathBuf)>> {
        Ok(self.list()?.pop())
    }
}
