//! Every network and optimiser state of an agent as one tree of named
//! tensors (`policy/...`, `critic/...`, `opt/policy/m/0`, ...): the
//! checkpoint's `networks.safetensors` is this tree, written as it is, and
//! loading takes every tensor out of it again. A tensor the tree holds but
//! nothing takes, or one that something asks for and the tree lacks, is an
//! error, so a network added to [`crate::Agent::params`] but not to
//! [`crate::Agent::load_params`] (or the reverse) cannot pass unnoticed.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use ddppo_models::{OptimizerState, ProbabilisticEnsemble};

use crate::nn::{Adam, sorted_vars};
use crate::{Error, Result};

/// Named tensors, sorted by name.
#[derive(Debug, Default)]
pub struct ParamTree {
    tensors: BTreeMap<String, Tensor>,
    /// Names read so far by the `load_` methods (see [`ParamTree::finish`]).
    taken: RefCell<BTreeSet<String>>,
}

fn missing(name: &str) -> Error {
    Error::Shape(format!("no tensor `{name}`"))
}

impl ParamTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| missing(name))?;
        self.taken.borrow_mut().insert(name.to_string());
        Ok(t)
    }

    fn insert(&mut self, name: String, t: Tensor) -> Result<()> {
        if self.tensors.insert(name.clone(), t).is_some() {
            return Err(Error::Shape(format!("tensor `{name}` added twice")));
        }
        Ok(())
    }

    /// Adds `var` as `name`.
    pub fn add_var(&mut self, name: &str, var: &Var) -> Result<()> {
        self.insert(name.to_string(), var.as_tensor().clone())
    }

    /// Sets `var` from the tensor `name` (same shape; converted to its dtype).
    pub fn load_var(&self, name: &str, var: &Var) -> Result<()> {
        let value = self.get(name)?;
        if value.dims() != var.dims() {
            return Err(Error::Shape(format!(
                "tensor `{name}` has shape {:?}, the network {:?}",
                value.dims(),
                var.dims()
            )));
        }
        Ok(var.set(&value.to_dtype(var.dtype())?.to_device(var.device())?)?)
    }

    /// Adds every variable of `vm` as `prefix/NAME`.
    pub fn add_varmap(&mut self, prefix: &str, vm: &VarMap) -> Result<()> {
        for (name, var) in sorted_vars(vm) {
            self.add_var(&format!("{prefix}/{name}"), &var)?;
        }
        Ok(())
    }

    /// Sets every variable of `vm` from `prefix/NAME`.
    pub fn load_varmap(&self, prefix: &str, vm: &VarMap) -> Result<()> {
        for (name, var) in sorted_vars(vm) {
            self.load_var(&format!("{prefix}/{name}"), &var)?;
        }
        Ok(())
    }

    /// Adds an optimiser state as `prefix/step` (one `i64`), `prefix/m/I`
    /// and `prefix/v/I`; nothing for `None` (an ensemble not yet trained).
    pub fn add_optimizer(&mut self, prefix: &str, state: Option<(u64, &[Tensor], &[Tensor])>) -> Result<()> {
        let Some((step, m, v)) = state else { return Ok(()) };
        let step = i64::try_from(step).map_err(|_| Error::Shape(format!("`{prefix}` step count {step}")))?;
        self.insert(format!("{prefix}/step"), Tensor::new(&[step], &Device::Cpu)?)?;
        for (i, (m, v)) in m.iter().zip(v).enumerate() {
            self.insert(format!("{prefix}/m/{i}"), m.clone())?;
            self.insert(format!("{prefix}/v/{i}"), v.clone())?;
        }
        Ok(())
    }

    /// The optimiser state under `prefix` (`None` when the tree has none).
    pub fn load_optimizer(&self, prefix: &str) -> Result<Option<OptimizerState>> {
        let step_name = format!("{prefix}/step");
        if !self.tensors.contains_key(&step_name) {
            return Ok(None);
        }
        let step = self.get(&step_name)?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        let step = match step.as_slice() {
            [s] if *s >= 0 => *s as u64,
            _ => return Err(Error::Shape(format!("tensor `{step_name}` is not one step count"))),
        };
        let count = self.tensors.keys().filter(|k| k.starts_with(&format!("{prefix}/m/"))).count();
        let mut m = Vec::with_capacity(count);
        let mut v = Vec::with_capacity(count);
        for i in 0..count {
            m.push(self.get(&format!("{prefix}/m/{i}"))?.clone());
            v.push(self.get(&format!("{prefix}/v/{i}"))?.clone());
        }
        Ok(Some(OptimizerState { step, m, v }))
    }

    /// Adds an [`Adam`]'s moments and step count under `prefix`.
    pub fn add_adam(&mut self, prefix: &str, opt: &Adam) -> Result<()> {
        let (m, v) = opt.moments();
        self.add_optimizer(prefix, Some((opt.step, m, v)))
    }

    /// Restores an [`Adam`] from `prefix` (it must be there).
    pub fn load_adam(&self, prefix: &str, opt: &mut Adam) -> Result<()> {
        let s = self.load_optimizer(prefix)?.ok_or_else(|| missing(&format!("{prefix}/step")))?;
        let device = opt.vars().first().map(|v| v.device().clone()).unwrap_or(Device::Cpu);
        let to = |t: Vec<Tensor>| t.into_iter().map(|t| t.to_device(&device)).collect::<candle_core::Result<Vec<_>>>();
        opt.restore(s.step, to(s.m)?, to(s.v)?)
    }

    /// Adds an ensemble's weights, input scaler and elites as `prefix/NAME`.
    pub fn add_ensemble(&mut self, prefix: &str, ensemble: &ProbabilisticEnsemble) -> Result<()> {
        for (name, t) in ensemble.tensors()? {
            self.insert(format!("{prefix}/{name}"), t)?;
        }
        Ok(())
    }

    /// Sets an ensemble from `prefix/NAME` (every tensor present, same shapes).
    pub fn load_ensemble(&self, prefix: &str, ensemble: &mut ProbabilisticEnsemble) -> Result<()> {
        let get = |name: &str| self.get(&format!("{prefix}/{name}")).cloned().map_err(|e| e.to_string());
        ensemble.load_tensors(&get).map_err(|e| Error::Shape(format!("ensemble `{prefix}`: {e}")))
    }

    /// Fails when a tensor of the tree was never read by a `load_` method
    /// (a network saved but not loaded).
    pub fn finish(&self) -> Result<()> {
        let taken = self.taken.borrow();
        match self.tensors.keys().find(|k| !taken.contains(*k)) {
            Some(name) => Err(Error::Shape(format!("tensor `{name}` belongs to no network of this agent"))),
            None => Ok(()),
        }
    }

    /// Writes the tree as one safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let map: std::collections::HashMap<&str, Tensor> =
            self.tensors.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        candle_core::safetensors::save(&map, path)
            .map_err(|e| Error::Checkpoint { path: path.display().to_string(), reason: e.to_string() })
    }

    /// Reads a tree written by [`ParamTree::save`] onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let map = candle_core::safetensors::load(path, device)
            .map_err(|e| Error::Checkpoint { path: path.display().to_string(), reason: e.to_string() })?;
        Ok(Self { tensors: map.into_iter().collect(), taken: RefCell::default() })
    }
}

impl crate::Agent {
    /// Every network and optimiser state of the agent as one tree: `policy/`,
    /// `critic/`, `critic_target/`, `temperature/log_alpha`, the ensembles'
    /// weights, input scaler and elites under `prediction/` and `gradient/`,
    /// and under `opt/` the Adam states of the policy, critic and temperature
    /// and, once trained, of the ensembles.
    pub fn params(&self) -> Result<ParamTree> {
        let mut t = ParamTree::new();
        t.add_varmap("policy", self.policy.varmap())?;
        t.add_varmap("critic", self.critic.varmap())?;
        t.add_varmap("critic_target", self.critic.target_varmap())?;
        t.add_var("temperature/log_alpha", self.temperature.var())?;
        t.add_adam("opt/policy", &self.policy_opt)?;
        t.add_adam("opt/critic", &self.critic_opt)?;
        t.add_adam("opt/alpha", &self.alpha_opt)?;
        if let Some(models) = &self.models {
            t.add_ensemble("prediction", models.prediction.ensemble())?;
            if let Some(g) = &models.gradient {
                t.add_ensemble("gradient", g.ensemble())?;
            }
            let s = models.prediction.optimizer_state();
            t.add_optimizer("opt/prediction", s.as_ref().map(|s| (s.step, &s.m[..], &s.v[..])))?;
            if let Some(g) = &models.gradient {
                let s = g.optimizer_state();
                t.add_optimizer("opt/gradient", s.as_ref().map(|s| (s.step, &s.m[..], &s.v[..])))?;
            }
        }
        Ok(t)
    }

    /// Sets every network and optimiser state from a tree of [`Agent::params`];
    /// a tensor missing, of another shape, or left over is an error.
    pub fn load_params(&mut self, t: &ParamTree) -> Result<()> {
        t.load_varmap("policy", self.policy.varmap())?;
        t.load_varmap("critic", self.critic.varmap())?;
        t.load_varmap("critic_target", self.critic.target_varmap())?;
        t.load_var("temperature/log_alpha", self.temperature.var())?;
        t.load_adam("opt/policy", &mut self.policy_opt)?;
        t.load_adam("opt/critic", &mut self.critic_opt)?;
        t.load_adam("opt/alpha", &mut self.alpha_opt)?;
        if let Some(models) = self.models.as_mut() {
            t.load_ensemble("prediction", models.prediction.ensemble_mut())?;
            if let Some(g) = models.gradient.as_mut() {
                t.load_ensemble("gradient", g.ensemble_mut())?;
            }
            models.prediction.restore_optimizer_state(t.load_optimizer("opt/prediction")?)?;
            if let Some(g) = models.gradient.as_mut() {
                g.restore_optimizer_state(t.load_optimizer("opt/gradient")?)?;
            }
        }
        self.snapshot = None;
        t.finish()
    }
}
