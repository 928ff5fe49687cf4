//! Seconds per product of `gemm_split` at 1 and 2 threads, at the per-step
//! updates' shapes (m x n x k):
//! `cargo run -p ddppo-models --release --example split_timing`
use ddppo_models::split::gemm_split;
use std::time::Instant;

fn main() {
    for (m, n, k) in [(256, 256, 256), (256, 256, 35), (256, 16, 256), (51, 200, 200), (51, 200, 35), (256, 35, 256)] {
        let lhs = vec![0.5f32; m * k];
        let rhs = vec![0.25f32; k * n];
        let mut dst = vec![0f32; m * n];
        let mut line = format!("{m}x{n}x{k}:");
        for threads in [1, 2, 1, 2] {
            let reps = 2000;
            let t = Instant::now();
            for _ in 0..reps {
                // SAFETY: contiguous row-major buffers of the stated sizes.
                unsafe {
                    gemm_split(
                        (m, n, k),
                        dst.as_mut_ptr(),
                        (1, n as isize),
                        lhs.as_ptr(),
                        (1, k as isize),
                        rhs.as_ptr(),
                        (1, n as isize),
                        threads,
                    )
                };
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
            line += &format!(" t{threads} {us:.1} us ({:.0} GFLOP/s)", 2.0 * (m * n * k) as f64 / us / 1e3);
        }
        println!("{line}");
    }
}
