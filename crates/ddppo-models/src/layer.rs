//! The ensemble linear layer: `E` independent dense layers evaluated by one
//! batched matmul (weights `E x in x out`).
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use rand::Rng;
use rand_distr::StandardNormal;

use crate::Result;

/// `E` dense layers `z_e = h_e W_e + b_e` stacked along a leading member axis.
#[derive(Clone, Debug)]
pub struct EnsembleLinear {
    pub(crate) weight: Var,
    pub(crate) bias: Var,
    members: usize,
    in_dim: usize,
    out_dim: usize,
}

/// A truncated normal draw (cut at two standard deviations, as TensorFlow's
/// `truncated_normal` that MBPO uses), redrawn until inside.
pub(crate) fn truncated_normal(rng: &mut impl Rng, std: f64) -> f64 {
    loop {
        let z: f64 = rng.sample(StandardNormal);
        if z.abs() <= 2.0 {
            return z * std;
        }
    }
}

/// A host vector uploaded in the requested dtype. Candle's CPU `randn` cannot
/// be seeded, so every random tensor is drawn on the host and uploaded.
pub(crate) fn host_tensor(data: Vec<f64>, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    crate::transfer::upload_f64(data, shape, dtype, device)
}

/// The parameter `Var` registered under `name` in the `VarBuilder`'s map.
pub(crate) fn named_var(
    vb: &VarBuilder,
    map: &candle_nn::VarMap,
    name: &str,
    shape: &[usize],
    init: Tensor,
) -> Result<Var> {
    // Registering through the VarBuilder gives the parameter its stable path name.
    let _ = vb.get_with_hints(shape, name, Init::Const(0.0))?;
    let full = if vb.prefix().is_empty() { name.to_string() } else { format!("{}.{name}", vb.prefix()) };
    let var = map
        .data()
        .lock()
        .map_err(|_| crate::Error::Internal("var map lock poisoned".into()))?
        .get(&full)
        .cloned()
        .ok_or_else(|| crate::Error::Internal(format!("parameter {full} missing after registration")))?;
    var.set(&init)?;
    Ok(var)
}

impl EnsembleLinear {
    /// Weights drawn from a truncated normal with std `1 / (2 sqrt(fan_in))`, biases 0
    /// (ALGORITHM.md section 2).
    pub fn new(
        vb: &VarBuilder,
        map: &candle_nn::VarMap,
        members: usize,
        in_dim: usize,
        out_dim: usize,
        rng: &mut impl Rng,
    ) -> Result<Self> {
        let std = 1.0 / (2.0 * (in_dim as f64).sqrt());
        let w: Vec<f64> = (0..members * in_dim * out_dim).map(|_| truncated_normal(rng, std)).collect();
        let w = host_tensor(w, &[members, in_dim, out_dim], vb.dtype(), vb.device())?;
        let b = Tensor::zeros((members, 1, out_dim), vb.dtype(), vb.device())?;
        let weight = named_var(vb, map, "weight", &[members, in_dim, out_dim], w)?;
        let bias = named_var(vb, map, "bias", &[members, 1, out_dim], b)?;
        Ok(Self { weight, bias, members, in_dim, out_dim })
    }

    pub fn members(&self) -> usize {
        self.members
    }
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Weight and bias of all members, or of one member (leading axis of size 1);
    /// `frozen`: detached from the `Var`s (same storage, no gradient reaches them).
    pub(crate) fn params(&self, member: Option<usize>, frozen: bool) -> Result<(Tensor, Tensor)> {
        let (w, b) = if frozen {
            (self.weight.as_tensor().detach(), self.bias.as_tensor().detach())
        } else {
            (self.weight.as_tensor().clone(), self.bias.as_tensor().clone())
        };
        match member {
            None => Ok((w, b)),
            Some(m) => Ok((w.narrow(0, m, 1)?, b.narrow(0, m, 1)?)),
        }
    }
}
