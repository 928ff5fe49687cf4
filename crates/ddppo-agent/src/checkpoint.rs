//! Checkpoints: everything a run's future depends on, so that a resumed run
//! continues exactly as the uninterrupted one would have (on the CPU, bit for
//! bit). A checkpoint is derived from the agent's parts, each written whole:
//! the [`RunState`] (serde), the parameter tree ([`crate::ParamTree`]), the
//! ensembles, the buffers and the simulator state; nothing is copied field
//! by field.
//!
//! One checkpoint is a directory:
//!
//! | file | holds |
//! |---|---|
//! | `state.json` | format, config, the env's simulator state, and the [`RunState`]: counters, observation, episode bookkeeping, metric accumulators, the four random streams (seed, stream, word position), `mid_step` |
//! | `networks.safetensors` | the parameter tree: policy, critic, target critic, temperature, the ensembles (weights, scaler, elites), and the Adam states (moments, step count) of all five optimisers |
//! | `env_buffer.bin`, `model_buffer.bin` | `D_env` and `D_model` |
//! | `jacobian_probe.safetensors` | the Jacobian diagnostics' held-out states, true Jacobians and directions (once drawn) |
//! | `clock.json` | wall-clock figures (`wall_s`, `phase_s`): the one file that differs between two otherwise identical checkpoints, so it is outside the manifest |
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

use candle_core::{DType, Device};
use ddppo_buffer::{Fnv1a, ReplayBuffer};
use ddppo_env::EnvFactory;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::agent::{Agent, PhaseTimes};
use crate::config::{AgentConfig, IntoValidConfig};
use crate::jacobian_error::JacobianProbe;
use crate::params::ParamTree;
use crate::run_state::RunState;
use crate::sac::GaussianPolicy;
use crate::{Error, Result};

/// The format tag in `state.json` and `MANIFEST.json`.
pub const FORMAT: &str = "ddppo-checkpoint/2";
const STATE: &str = "state.json";
const CLOCK: &str = "clock.json";
const MANIFEST: &str = "MANIFEST.json";
const NETWORKS: &str = "networks.safetensors";
const ENV_BUFFER: &str = "env_buffer.bin";
const MODEL_BUFFER: &str = "model_buffer.bin";
/// The held-out states of the Jacobian diagnostics, once drawn.
const JACOBIAN_PROBE: &str = "jacobian_probe.safetensors";

/// The config keys that [`Agent::branch_from_checkpoint`] cannot change:
/// they fix the shapes of the networks and buffers (or which networks there
/// are), or, `seed`, the random streams the checkpoint continues.
pub const KEPT_BY_BRANCH: &[&str] = &[
    "task",
    "variant",
    "seed",
    "hidden",
    "double_params_hidden",
    "replay_size",
    "model.ensemble_size",
    "model.elites",
    "model.hidden",
    "model.hidden_layers",
];

fn ck(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.display().to_string(), reason: reason.into() }
}

fn io(path: &Path, e: std::io::Error) -> Error {
    ck(path, e.to_string())
}

/// `state.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    format: String,
    /// The run's config as TOML.
    config: String,
    /// [`ddppo_env::Env::save_state`] of the training env.
    env_state: Vec<f64>,
    run: RunState,
}

/// `clock.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Clock {
    wall_s: f64,
    phase_s: PhaseTimes,
}

fn format_error(path: &Path, found: &str) -> Error {
    ck(path, format!("format `{found}` is not `{FORMAT}` (written by another version of ddppo; start a new run)"))
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

impl Agent {
    /// Writes this agent's complete state into the existing, empty directory
    /// `dir` (see the module docs); `MANIFEST.json` is written last.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let mut files = Vec::new();
        let path = dir.join(NETWORKS);
        self.params()?.save(&path)?;
        sync_file(&path)?;
        files.push(NETWORKS);
        if let Some(probe) = &self.jacobian_probe {
            let path = dir.join(JACOBIAN_PROBE);
            probe.save(&path)?;
            sync_file(&path)?;
            files.push(JACOBIAN_PROBE);
        }
        // Buffers (each written to a temporary name, synced and renamed).
        self.env_buffer.save(&dir.join(ENV_BUFFER))?;
        self.model_buffer.save(&dir.join(MODEL_BUFFER))?;
        files.extend([ENV_BUFFER, MODEL_BUFFER]);
        let state = State {
            format: FORMAT.into(),
            config: self.cfg.to_toml()?,
            env_state: self.env.save_state(),
            run: self.run.clone(),
        };
        write_json(&dir.join(STATE), &state)?;
        files.push(STATE);
        let clock = Clock { wall_s: self.started.elapsed().as_secs_f64(), phase_s: self.times };
        write_json(&dir.join(CLOCK), &clock)?;
        // The manifest, last: a directory without one is incomplete.
        let mut sums = BTreeMap::new();
        for f in files {
            let (h, n) = checksum(&dir.join(f))?;
            sums.insert(f.to_string(), FileSum { bytes: n, fnv1a64: format!("{h:016x}") });
        }
        let manifest = Manifest { format: FORMAT.into(), env_steps: self.run.env_steps, files: sums };
        write_json(&dir.join(MANIFEST), &manifest)?;
        sync_file(dir)
    }

    /// Rebuilds the agent of `cfg` on `device` and loads the checkpoint in
    /// `dir` into it. Every file is checked against the manifest first and
    /// the checkpoint's config must equal `cfg`; any problem is an
    /// [`Error::Checkpoint`] naming the file.
    pub fn from_checkpoint(cfg: impl IntoValidConfig, device: Device, dir: &Path) -> Result<Self> {
        let cfg = cfg.into_valid()?;
        verify(dir, None)?;
        let state = read_state_of(dir, &cfg)?;
        Self::load_checkpoint(cfg, device, dir, state)
    }

    /// A new run that starts from the checkpoint in `dir` with `cfg`, which
    /// may differ from the checkpoint's config in any key but
    /// [`KEPT_BY_BRANCH`]: the same networks, optimiser moments, buffers,
    /// simulator state and random streams, trained on from there under the
    /// new settings (with `cfg` equal to the checkpoint's, exactly the
    /// resumed run). The checkpoint must lie at a step boundary (not inside
    /// an interrupted model training). The agent has no checkpoint of its
    /// own yet; the Jacobian diagnostics' held-out states are drawn again
    /// when their number or directions change.
    pub fn branch_from_checkpoint(cfg: impl IntoValidConfig, device: Device, dir: &Path) -> Result<Self> {
        let cfg = cfg.into_valid()?;
        verify(dir, None)?;
        let saved = check_branch(dir, &cfg)?;
        let (state, _) = read_state(dir)?;
        let probe_changed =
            (saved.jacobian_states, saved.jacobian_directions) != (cfg.jacobian_states, cfg.jacobian_directions);
        let mut agent = Self::load_checkpoint(cfg, device, dir, state)?;
        if probe_changed {
            agent.jacobian_probe = None;
        }
        agent.saved = None;
        Ok(agent)
    }

    /// Loads the verified checkpoint in `dir`, whose `state.json` is
    /// `state`, into a new agent of `cfg`.
    fn load_checkpoint(cfg: crate::ValidConfig, device: Device, dir: &Path, state: State) -> Result<Self> {
        let mut agent = Agent::with_device(cfg, device.clone())?;
        let path = dir.join(NETWORKS);
        let tree = ParamTree::load(&path, &device)?;
        agent.load_params(&tree).map_err(|e| ck(&path, e.to_string()))?;
        let probe = dir.join(JACOBIAN_PROBE);
        if probe.exists() {
            agent.jacobian_probe = Some(JacobianProbe::load(&probe, agent.env.obs_dim(), agent.env.act_dim())?);
        }
        agent.env_buffer = load_buffer(&dir.join(ENV_BUFFER), &agent.env_buffer)?;
        agent.model_buffer = load_buffer(&dir.join(MODEL_BUFFER), &agent.model_buffer)?;
        let spath = dir.join(STATE);
        agent.env.restore_state(&state.env_state).map_err(|e| ck(&spath, e.to_string()))?;
        if state.run.obs.len() != agent.env.obs_dim() {
            return Err(ck(
                &spath,
                format!("observation has {} values, the env {}", state.run.obs.len(), agent.env.obs_dim()),
            ));
        }
        agent.run = state.run;
        let cpath = dir.join(CLOCK);
        let bytes = fs::read(&cpath).map_err(|e| io(&cpath, e))?;
        let clock: Clock = serde_json::from_slice(&bytes).map_err(|e| ck(&cpath, format!("unreadable: {e}")))?;
        agent.times = clock.phase_s;
        let now = Instant::now();
        agent.started = now.checked_sub(Duration::from_secs_f64(clock.wall_s.max(0.0))).unwrap_or(now);
        agent.saved = Some((agent.run.env_steps, agent.run.mid_step));
        Ok(agent)
    }
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| ck(path, e.to_string()))?;
    write_synced(path, &json)
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

/// `state.json` of the checkpoint in `dir`, and the config it holds.
fn read_state(dir: &Path) -> Result<(State, AgentConfig)> {
    let path = dir.join(STATE);
    let bytes = fs::read(&path).map_err(|e| io(&path, e))?;
    let state: State = serde_json::from_slice(&bytes).map_err(|e| ck(&path, format!("unreadable: {e}")))?;
    if state.format != FORMAT {
        return Err(format_error(&path, &state.format));
    }
    let saved: AgentConfig =
        toml::from_str(&state.config).map_err(|e| ck(&path, format!("its config does not parse: {}", e.message())))?;
    Ok((state, saved))
}

/// `state.json` of the checkpoint in `dir`, which must have been written
/// with `cfg`.
fn read_state_of(dir: &Path, cfg: &AgentConfig) -> Result<State> {
    let (state, saved) = read_state(dir)?;
    if &saved != cfg {
        let keys = saved.differing_keys(cfg)?.join(", ");
        let path = dir.join(STATE);
        return Err(ck(&path, format!("it was written by a run with a different config (differing keys: {keys})")));
    }
    Ok(state)
}

/// The config that the checkpoint in `dir` was written with (its
/// `state.json`, checked against the manifest).
pub fn checkpoint_config(dir: &Path) -> Result<AgentConfig> {
    verify(dir, Some(&[STATE]))?;
    Ok(read_state(dir)?.1)
}

/// Whether a branch ([`Agent::branch_from_checkpoint`]) from the checkpoint
/// in `dir` under `cfg` can start: `cfg` keeps every key of
/// [`KEPT_BY_BRANCH`], the checkpoint lies at a step boundary, and `cfg`'s
/// run ends after it. Reads only `state.json` (checked against the
/// manifest); returns the checkpoint's config.
pub fn check_branch(dir: &Path, cfg: &AgentConfig) -> Result<AgentConfig> {
    verify(dir, Some(&[STATE]))?;
    let (state, saved) = read_state(dir)?;
    let kept: Vec<String> =
        saved.differing_keys(cfg)?.into_iter().filter(|k| KEPT_BY_BRANCH.contains(&k.as_str())).collect();
    if !kept.is_empty() {
        return Err(Error::Config(format!(
            "a branch cannot change {} (the checkpoint's networks, buffers or random streams depend on {}); start a new run instead",
            kept.join(", "),
            if kept.len() == 1 { "it" } else { "them" }
        )));
    }
    if state.run.mid_step {
        return Err(ck(
            &dir.join(STATE),
            "it was written inside a model training (an interrupted run); branch from a checkpoint at a step boundary",
        ));
    }
    let step = state.run.env_steps;
    if cfg.total_steps() <= step {
        return Err(Error::Config(format!(
            "the branch's config ends at {} env steps, which the checkpoint at {step} has reached; raise `epochs`",
            cfg.total_steps()
        )));
    }
    Ok(saved)
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
        return Err(format_error(&path, &manifest.format));
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
    read_state_of(dir, cfg)?;
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
    ParamTree::load(&path, device)?.load_varmap("policy", policy.varmap()).map_err(|e| ck(&path, e.to_string()))?;
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
    pub fn save(&self, agent: &mut Agent) -> Result<PathBuf> {
        fs::create_dir_all(&self.root).map_err(|e| io(&self.root, e))?;
        let name = format!("step-{:010}", agent.run.env_steps);
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
        agent.saved = Some((agent.run.env_steps, agent.run.mid_step));
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
