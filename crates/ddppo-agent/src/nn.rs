//! Building blocks shared by the SAC networks: seeded fully connected layers
//! registered in a [`VarMap`], an MLP, Adam with per-value gradient clipping,
//! and Polyak averaging.
//!
//! candle's CPU `randn` cannot be seeded, so every initial weight is drawn on
//! the host from a `ChaCha8Rng` and uploaded; the names in the `VarMap` are the
//! `VarBuilder` paths (`l0.weight`, `l0.bias`, ...), which keeps checkpoints
//! stable.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Linear, Module, VarBuilder, VarMap};
use rand::Rng;

use crate::Result;
use crate::fused::{AdamUpdate, PolyakUpdate, dense, linear, split_threads};

/// Registers a `fan_out x fan_in` weight (Xavier-uniform, as the SAC
/// reference initialises its layers) and a zero bias under `vb`'s prefix,
/// drawn from `rng`, and returns the layer reading them through `vb`.
pub fn seeded_linear(
    vm: &VarMap,
    vb: &VarBuilder,
    fan_in: usize,
    fan_out: usize,
    rng: &mut impl Rng,
) -> Result<Linear> {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    let w: Vec<f64> = (0..fan_in * fan_out).map(|_| rng.random_range(-bound..bound)).collect();
    let w = Tensor::from_vec(w, (fan_out, fan_in), vb.device())?.to_dtype(vb.dtype())?;
    let b = Tensor::zeros(fan_out, vb.dtype(), vb.device())?;
    {
        let mut data = vm.data().lock().map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        data.insert(format!("{}weight", prefix(vb)), Var::from_tensor(&w)?);
        data.insert(format!("{}bias", prefix(vb)), Var::from_tensor(&b)?);
    }
    let weight = vb.get((fan_out, fan_in), "weight")?;
    let bias = vb.get(fan_out, "bias")?;
    Ok(Linear::new(weight, Some(bias)))
}

fn prefix(vb: &VarBuilder) -> String {
    let p = vb.prefix();
    if p.is_empty() { p } else { format!("{p}.") }
}

/// A ReLU multi-layer perceptron `in -> hidden... -> out`, layers `l0, l1, ...`.
#[derive(Clone, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    /// Creates the layers under `vb` with seeded initial weights stored in `vm`.
    pub fn new(
        vm: &VarMap,
        vb: VarBuilder,
        input: usize,
        hidden: &[usize],
        output: usize,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        let mut dims = vec![input];
        dims.extend_from_slice(hidden);
        dims.push(output);
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, d)| seeded_linear(vm, &vb.pp(format!("l{i}")), d[0], d[1], rng))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// `x`: rows x input (other ranks go through candle's `Linear`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            h = match (h.rank(), l.bias(), i < last) {
                (2, Some(b), hidden) => dense(&h, l.weight(), b, hidden, split_threads())?,
                (_, _, hidden) => {
                    let y = l.forward(&h)?;
                    if hidden { y.relu()? } else { y }
                }
            };
        }
        Ok(h)
    }

    /// As [`Mlp::forward`] with the parameters treated as constants: the
    /// result is differentiable in `x` only, so a backward pass computes no
    /// parameter gradients (the policy update differentiates through the
    /// critic but never steps it).
    pub fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            let w = l.weight().detach();
            h = match (l.bias(), i < last) {
                (Some(b), hidden) => dense(&h, &w, &b.detach(), hidden, split_threads())?,
                (None, true) => linear(&h, &w, split_threads())?.relu()?,
                (None, false) => linear(&h, &w, split_threads())?,
            };
        }
        Ok(h)
    }

    /// Multiply-adds of one row's forward pass (the products).
    pub fn work_per_row(&self) -> usize {
        self.layers.iter().map(|l| l.weight().elem_count()).sum()
    }

    /// The layers' `(weight, bias)` tensors, input side first.
    pub fn layers(&self) -> impl Iterator<Item = (&Tensor, Option<&Tensor>)> {
        self.layers.iter().map(|l| (l.weight(), l.bias()))
    }
}

/// Adam (Kingma & Ba) over a fixed list of variables, with every gradient
/// value clipped to `[-clip, clip]` before the moment update, as the
/// reference's `clip_grad_value_` does. Weight decay is zero throughout
/// ALGORITHM.md section 5, so there is none here.
///
/// The moments are plain tensors and the step count a field, so a checkpoint
/// can save and restore the optimiser exactly.
#[derive(Debug)]
pub struct Adam {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Number of steps taken.
    pub step: u64,
    /// Learning rate.
    pub lr: f64,
    /// Gradient values are clipped to `±clip` (`None`: no clipping).
    pub clip: Option<f64>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    fused: bool,
}

impl Adam {
    /// Adam with betas (0.9, 0.999) and eps 1e-8, PyTorch's defaults.
    pub fn new(vars: Vec<Var>, lr: f64, clip: Option<f64>) -> Result<Self> {
        let m = vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        let fused = vars.iter().all(|v| v.device().is_cpu());
        Ok(Self { vars, m, v, step: 0, lr, clip, beta1: 0.9, beta2: 0.999, eps: 1e-8, fused })
    }

    /// Uses the single-pass CPU step ([`crate::fused`], the default on the
    /// CPU) or the tensor ops (the other devices; a test hook on the CPU).
    /// Both compute the same values bit for bit.
    #[doc(hidden)]
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on && self.vars.iter().all(|v| v.device().is_cpu());
    }

    /// The variables this optimiser steps.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The first and second moments, in the order of [`Adam::vars`].
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Restores the state saved from [`Adam::moments`] and [`Adam::step`]
    /// (checkpoint resume); shapes must match the variables.
    pub fn restore(&mut self, step: u64, m: Vec<Tensor>, v: Vec<Tensor>) -> Result<()> {
        if m.len() != self.vars.len() || v.len() != self.vars.len() {
            return Err(crate::Error::Shape(format!(
                "optimiser state has {} / {} moments for {} variables",
                m.len(),
                v.len(),
                self.vars.len()
            )));
        }
        for ((var, m), v) in self.vars.iter().zip(&m).zip(&v) {
            if m.dims() != var.dims() || v.dims() != var.dims() {
                return Err(crate::Error::Shape("optimiser moment shape differs from its variable".into()));
            }
        }
        self.step = step;
        self.m = m;
        self.v = v;
        Ok(())
    }

    /// One step from the gradients of `loss`; variables without a gradient
    /// (not in the graph) are left alone.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step_with(|var| grads.get(var.as_tensor()).cloned())
    }

    /// One step with the gradient of each variable given by `grad`.
    pub fn step_with(&mut self, mut grad: impl FnMut(&Var) -> Option<Tensor>) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        // A variable's gradient can come out of the backward pass still in the
        // graph (`exp`'s is `grad * exp(x)`, a tracked op): the moments built
        // from it would then hold the previous moments, a chain that grows by
        // one link per step and is never freed (temperature updates leaked
        // ~4 KB each). Detaching changes no value.
        let grads: Vec<(usize, Tensor)> =
            self.vars.iter().enumerate().filter_map(|(i, var)| grad(var).map(|g| (i, g.detach()))).collect();
        if self.fused {
            let k = AdamUpdate {
                clip: self.clip,
                beta1: self.beta1,
                beta2: self.beta2,
                bc1,
                bc2,
                eps: self.eps,
                lr: self.lr,
            };
            // Each variable's step is its own: spread them over the helper threads.
            let (vars, m, v) = (&self.vars, &self.m, &self.v);
            let new = per_variable(
                &grads,
                |(_, g)| g.elem_count(),
                true,
                |(i, g)| k.apply(vars[*i].as_tensor(), &m[*i], &v[*i], g),
            )?;
            for ((i, _), (m, v)) in grads.iter().zip(new) {
                self.m[*i] = m;
                self.v[*i] = v;
            }
            return Ok(());
        }
        for (i, g) in grads {
            let var = &self.vars[i];
            let g = match self.clip {
                Some(c) => g.clamp(-c, c)?,
                None => g,
            };
            let m = ((&self.m[i] * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
            let update = ((&m / bc1)? / denom)?;
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// `target <- (1 - tau) target + tau source`, variable by variable.
pub fn polyak(target: &[Var], source: &[Var], tau: f64) -> Result<()> {
    let pairs: Vec<(&Var, &Var)> = target.iter().zip(source).collect();
    // Other devices' queues stay on this thread.
    let parallel = pairs.iter().all(|(t, s)| t.device().is_cpu() && s.device().is_cpu());
    per_variable(
        &pairs,
        |(t, _)| t.elem_count(),
        parallel,
        |(t, s)| -> Result<()> {
            if t.device().is_cpu() && s.is_contiguous() {
                t.as_tensor().inplace_op2(s.as_tensor(), &PolyakUpdate(tau))?;
            } else {
                t.set(&((t.as_tensor() * (1.0 - tau))? + (s.as_tensor() * tau)?)?)?;
            }
            Ok(())
        },
    )?;
    Ok(())
}

/// Below this many values in all, [`per_variable`] stays on the calling thread.
const MIN_SPLIT_VALUES: usize = 1 << 14;

/// `f` of every item (a variable's update, which touches that variable
/// alone), in order; with `parallel` (CPU tensors) the items spread over the
/// helper threads of `ddppo_models::split` in groups of about equal `size`
/// (the values an item updates):
/// the results do not depend on the thread count. The first error is returned.
fn per_variable<I: Sync, R: Send>(
    items: &[I],
    size: impl Fn(&I) -> usize,
    parallel: bool,
    f: impl Fn(&I) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let sizes: Vec<usize> = items.iter().map(size).collect();
    let threads = if parallel { split_threads() } else { 1 };
    let total: usize = sizes.iter().sum();
    if threads <= 1 || items.len() < 2 || total < MIN_SPLIT_VALUES {
        return items.iter().map(&f).collect();
    }
    let parts = balanced_groups(&sizes, threads.min(items.len()));
    let slots: Vec<std::sync::Mutex<Option<Result<R>>>> = items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    ddppo_models::split::run_parts(parts.len(), threads, &|p| {
        for &i in &parts[p] {
            let r = f(&items[i]);
            *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        }
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or_else(|| Err(candle_core::Error::Msg("a variable's update did not run".into()).into()))
        })
        .collect()
}

/// Item indices in `parts` groups of about equal total size: largest first,
/// each to the group with the least so far (ties: the lower group); every
/// group non-empty when there are at least `parts` items.
fn balanced_groups(sizes: &[usize], parts: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    let mut groups = vec![Vec::new(); parts];
    let mut load = vec![0usize; parts];
    for i in order {
        let g = (0..parts).min_by_key(|&g| (load[g], groups[g].len(), g)).unwrap_or(0);
        load[g] += sizes[i].max(1);
        groups[g].push(i);
    }
    groups.retain(|g| !g.is_empty());
    groups
}

/// The variables of `vm` sorted by name, so that the order (and therefore the
/// optimiser state layout) is reproducible.
pub fn sorted_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let data = match vm.data().lock() {
        Ok(d) => d,
        Err(p) => p.into_inner(),
    };
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Uploads host rows (`rows x cols`, f32) as a tensor of `dtype` (one counted
/// copy, `ddppo_models::transfer`).
pub fn upload(data: &[f32], rows: usize, cols: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(ddppo_models::transfer::upload(data.to_vec(), &[rows, cols], device)?.to_dtype(dtype)?)
}

/// A `rows x cols` tensor of standard normal draws from `rng` (one counted copy).
pub fn host_randn(rng: &mut impl Rng, rows: usize, cols: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let v: Vec<f64> = (0..rows * cols).map(|_| rng.sample(rand_distr::StandardNormal)).collect();
    Ok(ddppo_models::transfer::upload_f64(v, &[rows, cols], dtype, device)?)
}

#[cfg(test)]
mod tests {
    use super::balanced_groups;

    /// Every item in exactly one group, no group empty, groups in the same
    /// order for the same sizes, and no group heavier than another by more
    /// than the largest item.
    #[test]
    fn balanced_groups_partition_the_items_evenly() {
        let cases: &[&[usize]] =
            &[&[65536, 256, 256, 8960, 256, 1], &[1, 1, 1], &[5], &[], &[100, 100, 100, 100], &[7, 0, 3, 9, 9, 2]];
        for sizes in cases {
            for parts in 1..=3 {
                let groups = balanced_groups(sizes, parts);
                assert_eq!(groups, balanced_groups(sizes, parts));
                let mut all: Vec<usize> = groups.concat();
                all.sort_unstable();
                assert_eq!(all, (0..sizes.len()).collect::<Vec<_>>(), "{sizes:?} in {parts}");
                assert!(groups.iter().all(|g| !g.is_empty()));
                assert_eq!(groups.len(), parts.min(sizes.len()));
                let load: Vec<usize> = groups.iter().map(|g| g.iter().map(|&i| sizes[i].max(1)).sum()).collect();
                let spread = load.iter().max().unwrap_or(&0) - load.iter().min().unwrap_or(&0);
                assert!(
                    spread <= sizes.iter().map(|s| *s.max(&1)).max().unwrap_or(0),
                    "{sizes:?} in {parts}: {load:?}"
                );
            }
        }
    }
}
