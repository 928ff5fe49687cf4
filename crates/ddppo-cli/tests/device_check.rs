//! `ddppo device-check`: one line per agreement check, exit 0 when all pass;
//! without CUDA support, `--device cuda` is a one-line error.

mod common;

use common::ddppo;

#[test]
fn cpu_device_check_prints_one_line_per_check() {
    let o = ddppo(&["device-check", "--device", "cpu"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    assert!(lines.iter().all(|l| l.ends_with(" ok") && l.contains("tolerance")), "{out}");
    assert!(lines[0].starts_with("ensemble forward"), "{out}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_check_without_cuda_support_is_one_line() {
    let o = ddppo(&["device-check", "--device", "cuda"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains("no CUDA support"), "{err}");
    assert!(o.stdout.is_empty());
}
