//! Every copy between host memory and a tensor goes through here, so that the
//! copies can be counted. On a GPU each one is a synchronising round trip that
//! costs more than the small kernels of a training step, so the hot paths keep
//! data on the device and read scalars back once per epoch; the count lets a
//! CPU test hold them to that. On the CPU the same calls are plain copies.
//!
//! The count is per thread: training runs on the caller's thread, and tests
//! running in parallel do not see each other's copies.

use std::cell::Cell;

use candle_core::{DType, Device, Tensor, WithDType};

use crate::Result;

thread_local! {
    static COPIES: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    COPIES.with(|c| c.set(c.get() + 1));
}

/// Host-device copies made by this thread so far (each upload or read-back
/// through this module is one, whatever its size).
pub fn copies() -> u64 {
    COPIES.with(Cell::get)
}

/// A host vector uploaded as a tensor of `shape`.
pub fn upload<T: WithDType>(data: Vec<T>, shape: &[usize], device: &Device) -> Result<Tensor> {
    count();
    Ok(Tensor::from_vec(data, shape, device)?)
}

/// A host `f64` vector uploaded in the requested dtype (`f32` rounded on the
/// host, so that only the smaller buffer crosses).
pub fn upload_f64(data: Vec<f64>, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    match dtype {
        DType::F32 => upload(data.into_iter().map(|x| x as f32).collect::<Vec<f32>>(), shape, device),
        _ => Ok(upload(data, shape, device)?.to_dtype(dtype)?),
    }
}

/// All elements of `t`, row-major, as `f64` on the host.
pub fn download_f64(t: &Tensor) -> Result<Vec<f64>> {
    count();
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// All elements of `t`, row-major, as `f32` on the host.
pub fn download_f32(t: &Tensor) -> Result<Vec<f32>> {
    count();
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// A scalar tensor's value as `f64`.
pub fn download_scalar(t: &Tensor) -> Result<f64> {
    count();
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}
