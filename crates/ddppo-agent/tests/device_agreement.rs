//! The device agreement checks (`device_check`, run against CUDA by
//! `tests/cuda_agreement.rs` and `ddppo device-check`) run here with the CPU
//! as the device: the reference then uses the fused CPU kernels and the other
//! side the plain candle ops every other device runs, so the comparison code
//! and the plain path are exercised without a GPU.

use candle_core::Device;
use ddppo_agent::device_check::{agreement, relative_error};

#[test]
fn every_check_passes_cpu_against_cpu() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: set before any tensor work of this test binary; candle reads
        // it through std::env, which serialises access.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    let checks = agreement(&Device::Cpu).expect("checks");
    let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
    assert_eq!(
        names,
        [
            "ensemble forward",
            "ensemble NLL gradient",
            "gradient-loss gradient",
            "policy-update gradient",
            "model-env step",
            "adam step"
        ]
    );
    for c in &checks {
        assert!(c.passed(), "{c}");
        assert!(c.to_string().ends_with(" ok") && !c.to_string().contains('\n'), "{c}");
    }
}

#[test]
fn the_error_measure_sees_differences() {
    let reference = vec![vec![1.0, -3.0], vec![0.5]];
    assert_eq!(relative_error(&reference, &reference), 0.0);
    // One value off by 0.02 in a tensor of size 0.5: 0.02 / 0.5.
    let off = vec![vec![1.0, -3.0], vec![0.52]];
    assert!((relative_error(&off, &reference) - 0.04).abs() < 1e-12);
    // A tensor below 1e-3 of the largest one is measured against that: 1e-6 / (1e-3 * 3).
    let tiny = vec![vec![1.0, -3.0], vec![1e-6]];
    let zero = vec![vec![1.0, -3.0], vec![0.0]];
    assert!((relative_error(&tiny, &zero) - 1e-6 / 3e-3).abs() < 1e-12);
    assert_eq!(relative_error(&[vec![1e-9]], &[vec![0.0]]), f64::INFINITY);
    assert!(relative_error(&[vec![f64::NAN]], &[vec![0.0]]).is_nan());
    assert_eq!(relative_error(&[vec![1.0]], &[vec![1.0, 2.0]]), f64::INFINITY);
    assert_eq!(relative_error(&[vec![1.0]], &[vec![1.0], vec![]]), f64::INFINITY);
    let failed = ddppo_agent::device_check::Check { name: "x", error: f64::NAN, tolerance: 1e-4 };
    assert!(!failed.passed() && failed.to_string().ends_with("FAILED"));
}
