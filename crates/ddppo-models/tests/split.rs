//! A product split over helper threads (`ddppo_models::split`) equals the
//! unsplit gemm call bit for bit: over shapes around the split rules' edges
//! (single rows and columns, at most 256 elements, `k` up to and past 512),
//! transposed and strided operands, f32 and f64, and 1 to 4 threads.

use ddppo_models::split::{MAX_SPLIT_DEPTH, gemm_split, split_plan};
use rand::{Rng, SeedableRng};

/// The tests of this file one at a time: they share the process's helper
/// threads, and the overlap check of `join` needs the helper to be idle.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn whole<T: candle_core::WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    (lhs, ls): (&[T], (isize, isize)),
    (rhs, rs): (&[T], (isize, isize)),
) {
    // SAFETY: the buffers hold the strided extents (see `case`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            ls.0,
            ls.1,
            rhs.as_ptr(),
            rs.0,
            rs.1,
            T::from_f64(0.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Operands of `m x k` and `k x n`, each row-major or transposed (column-major),
/// the row-major ones with padded rows; values with signed zeros.
fn case<T: candle_core::WithDType>(rng: &mut rand_chacha::ChaCha8Rng, m: usize, n: usize, k: usize, layout: usize) {
    let values = |rng: &mut rand_chacha::ChaCha8Rng, len: usize| -> Vec<T> {
        (0..len)
            .map(|i| match i % 13 {
                0 => T::from_f64(-0.0),
                1 => T::from_f64(0.0),
                _ => T::from_f64(rng.random_range(-3.0..3.0)),
            })
            .collect()
    };
    let pad = 3;
    let (lhs, ls) = match layout & 1 {
        0 => (values(rng, m * (k + pad)), (1isize, (k + pad) as isize)),
        _ => (values(rng, m * k), (m as isize, 1isize)),
    };
    let (rhs, rs) = match layout & 2 {
        0 => (values(rng, k * (n + pad)), (1isize, (n + pad) as isize)),
        _ => (values(rng, k * n), (k as isize, 1isize)),
    };
    let mut expect = vec![T::from_f64(7.0); m * n];
    whole((m, n, k), &mut expect, (&lhs, ls), (&rhs, rs));
    for threads in 1..=4 {
        let mut got = vec![T::from_f64(7.0); m * n];
        // SAFETY: as in `whole`.
        unsafe {
            gemm_split((m, n, k), got.as_mut_ptr(), (1, n as isize), lhs.as_ptr(), ls, rhs.as_ptr(), rs, threads)
        };
        let bits = |v: &[T]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
        assert!(
            bits(&got) == bits(&expect),
            "{:?} {m}x{n}x{k} layout {layout} threads {threads}: plan {:?}",
            T::DTYPE,
            split_plan(m, n, k, threads)
        );
    }
}

#[test]
fn split_products_equal_the_whole_product_bit_for_bit() {
    let _serial = serial();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let sizes = [1usize, 2, 3, 16, 17, 27, 64, 65, 200, 256, 300];
    let depths = [1usize, 2, 3, 11, 27, 35, 200, 256, 512, 513, 700];
    let mut split = 0;
    for &m in &sizes {
        for &n in &sizes {
            for &k in &depths {
                // Keep the test quick: the largest shapes only with one depth each.
                if m * n * k > 300 * 300 * 256 && k != 700 {
                    continue;
                }
                let layout = rng.random_range(0..4);
                case::<f32>(&mut rng, m, n, k, layout);
                if split_plan(m, n, k, 2).is_some() {
                    split += 1;
                }
            }
        }
    }
    for (m, n, k) in [(256, 256, 256), (256, 16, 256), (256, 1, 256), (35, 256, 256), (51, 200, 200)] {
        for layout in 0..4 {
            case::<f32>(&mut rng, m, n, k, layout);
            case::<f64>(&mut rng, m, n, k, layout);
        }
    }
    assert!(split > 100, "only {split} shapes were split");
}

#[test]
fn split_plan_keeps_each_part_on_the_whole_products_kernel_path() {
    let _serial = serial();
    for m in [1usize, 2, 3, 8, 16, 100, 256, 1000] {
        for n in [1usize, 2, 3, 8, 16, 100, 256, 1000] {
            for k in [1usize, 2, 3, 64, 512, 513] {
                for threads in 1..=8 {
                    let Some((rows, parts)) = split_plan(m, n, k, threads) else { continue };
                    assert!((2..=threads).contains(&parts));
                    assert!((3..=MAX_SPLIT_DEPTH).contains(&k), "{m}x{n}x{k}");
                    let (long, short) = if rows { (m, n) } else { (n, m) };
                    let smallest = long / parts;
                    assert!(short >= 2 && smallest >= 2 && smallest * short > 256, "{m}x{n}x{k} in {parts}");
                }
            }
        }
    }
    assert_eq!(split_plan(256, 256, 256, 1), None);
    assert_eq!(split_plan(256, 256, 256, 2), Some((true, 2)));
}

/// `join` returns both results in order at 1 to 3 threads; with a helper the
/// second runs on another thread at the same time as the first (each waits
/// for the other to start), and products inside either still equal the whole
/// product; a panic in either part reaches the caller.
#[test]
fn join_runs_both_parts_and_keeps_products_exact() {
    let _serial = serial();
    use ddppo_models::split::{join, product};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let (m, n, k) = (96, 80, 64);
    let lhs: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    let rhs: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let expect = product((m, n, k), (&lhs, (1, k)), (&rhs, (1, n)), 1).unwrap();
    for threads in 1..=3 {
        let prod = || product((m, n, k), (&lhs, (1, k)), (&rhs, (1, n)), threads).unwrap();
        let (a, (b, label)) = join(threads, prod, || (prod(), "second"));
        assert!(a == expect && b == expect && label == "second", "{threads} threads");
        // Nested: a join inside a part runs too (on the calling thread when no helper is idle).
        let ((x, y), z) = join(threads, || join(threads, || 1, || 2), || 3);
        assert_eq!((x, y, z), (1, 2, 3));
    }
    // At the same time: each part waits (up to 10 s) for the other to have started.
    let (a_started, b_started) = (AtomicBool::new(false), AtomicBool::new(false));
    let wait_for = |mine: &AtomicBool, other: &AtomicBool| {
        mine.store(true, Ordering::SeqCst);
        let t = Instant::now();
        while !other.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(10) {
            std::hint::spin_loop();
        }
        other.load(Ordering::SeqCst)
    };
    let (a, b) = join(2, || wait_for(&a_started, &b_started), || wait_for(&b_started, &a_started));
    assert!(a && b, "the parts of a 2-thread join did not overlap");
    for side in 0..2 {
        let r = std::panic::catch_unwind(|| {
            join(2, || assert!(side != 0, "first part fails"), || assert!(side != 1, "second part fails"))
        });
        assert!(r.is_err(), "a panic in part {side} is resumed");
    }
}
