//! NeighbourIndex against exhaustive search on random and trajectory-like data.
//!
//! The two sides share only the metric definition (`exact_sq_dist` on the
//! search coordinates); the brute force here is written independently of the
//! crate's own fallback and compares complete sorted neighbour lists.

use ddppo_buffer::{Error, NeighbourIndex, NeighbourMethod, NeighbourOptions, effective_dimension, exact_sq_dist};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Independent reference: sort all other points by (distance, index).
fn reference(points: &[f32], dim: usize, n: usize, standardise: bool) -> Vec<u32> {
    let len = points.len() / dim;
    let mut c: Vec<f64> = points.iter().map(|&v| v as f64).collect();
    if standardise {
        for col in 0..dim {
            let mean = (0..len).map(|r| c[r * dim + col]).sum::<f64>() / len as f64;
            let var = (0..len).map(|r| (c[r * dim + col] - mean).powi(2)).sum::<f64>() / len as f64;
            let std = if var.sqrt() < 1e-12 { 1.0 } else { var.sqrt() };
            for r in 0..len {
                c[r * dim + col] = (c[r * dim + col] - mean) / std;
            }
        }
    }
    let mut table = Vec::with_capacity(len * n);
    for i in 0..len {
        let qi = &c[i * dim..(i + 1) * dim];
        let mut all: Vec<(f64, u32)> =
            (0..len).filter(|&j| j != i).map(|j| (exact_sq_dist(qi, &c[j * dim..(j + 1) * dim]), j as u32)).collect();
        all.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap().then(a.1.cmp(&b.1)));
        table.extend(all[..n].iter().map(|&(_, j)| j));
    }
    table
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Uniform,
    /// Momentum random walks with mixed column scales, restarted as episodes.
    Trajectory,
    /// Few distinct base points, each repeated with tiny jitter or exactly.
    NearDuplicates,
    /// Trajectories whose last columns (the "actions") are clipped to [-1, 1].
    Clipped,
}

fn make_points(kind: Kind, len: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut p = vec![0f32; len * dim];
    match kind {
        Kind::Uniform => p.iter_mut().for_each(|v| *v = rng.random_range(-1.0..1.0)),
        Kind::Trajectory | Kind::Clipped => {
            let scales: Vec<f32> = (0..dim).map(|_| 10f32.powf(rng.random_range(-2.0..1.5))).collect();
            let mut x = vec![0f32; dim];
            let mut vel = vec![0f32; dim];
            for r in 0..len {
                if r % 200 == 0 {
                    x.iter_mut().zip(&scales).for_each(|(v, s)| *v = rng.random_range(-0.1..0.1) * s);
                    vel.iter_mut().for_each(|v| *v = 0.0);
                }
                for k in 0..dim {
                    vel[k] = 0.9 * vel[k] + 0.1 * scales[k] * rng.random_range(-1.0f32..1.0);
                    x[k] += vel[k];
                }
                p[r * dim..(r + 1) * dim].copy_from_slice(&x);
            }
            if let Kind::Clipped = kind {
                let act = (dim / 3).max(1);
                for r in 0..len {
                    for k in dim - act..dim {
                        let v = &mut p[r * dim + k];
                        *v = (*v * 5.0).clamp(-1.0, 1.0);
                    }
                }
            }
        }
        Kind::NearDuplicates => {
            let bases = (len / 8).max(2);
            let base: Vec<f32> = (0..bases * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
            for r in 0..len {
                let b = rng.random_range(0..bases);
                let exact = rng.random_bool(0.3);
                for k in 0..dim {
                    let jitter = if exact { 0.0 } else { rng.random_range(-1e-4f32..1e-4) };
                    p[r * dim + k] = base[b * dim + k] + jitter;
                }
            }
        }
    }
    p
}

fn kind_strategy() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Uniform), Just(Kind::Trajectory), Just(Kind::NearDuplicates), Just(Kind::Clipped)]
}

fn method_strategy() -> impl Strategy<Value = NeighbourMethod> {
    prop_oneof![Just(NeighbourMethod::Auto), Just(NeighbourMethod::Tree), Just(NeighbourMethod::Gemm)]
}

fn dim_strategy() -> impl Strategy<Value = usize> {
    // DDPPO's widths, and any other width including some past the widest tree.
    prop_oneof![Just(3usize), Just(5), Just(14), Just(23), Just(35), Just(62), Just(70), 1usize..=70]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn same_neighbours_as_brute_force(
        kind in kind_strategy(),
        dim in dim_strategy(),
        len in 30usize..700,
        n in prop_oneof![Just(1usize), Just(5), Just(10), Just(25), 1usize..40],
        standardise in any::<bool>(),
        method in method_strategy(),
        seed in any::<u64>(),
    ) {
        let n = n.min(len - 1);
        let pts = make_points(kind, len, dim, seed);
        let opts = NeighbourOptions { standardise };
        let index = NeighbourIndex::build_with(&pts, dim, n, &opts, method).unwrap();
        if method != NeighbourMethod::Auto {
            prop_assert_eq!(index.method(), method);
        }
        prop_assert_eq!(index.len(), len);
        prop_assert_eq!(index.n(), n);
        let want = reference(&pts, dim, n, standardise);
        prop_assert_eq!(index.table(), &want[..]);
        for i in 0..len {
            prop_assert!(!index.neighbours(i).contains(&(i as u32)));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// The GEMM path alone, on every data kind, including tiles of more than
    /// one row block and column tile (len up to 2,600 > 128 and > 2,048).
    #[test]
    fn gemm_path_equals_brute_force(
        kind in kind_strategy(),
        dim in prop_oneof![Just(3usize), Just(14), Just(35), Just(62), Just(70), 1usize..=80],
        len in prop_oneof![30usize..400, 2040usize..2600],
        n in prop_oneof![Just(1usize), Just(5), Just(25), 1usize..40],
        standardise in any::<bool>(),
        offset in prop_oneof![Just(0.0f32), Just(1e3f32), -50.0f32..50.0],
        seed in any::<u64>(),
    ) {
        let n = n.min(len - 1);
        // A common offset: the centring must remove it.
        let pts: Vec<f32> = make_points(kind, len, dim, seed).iter().map(|v| v + offset).collect();
        let opts = NeighbourOptions { standardise };
        let index = NeighbourIndex::build_with(&pts, dim, n, &opts, NeighbourMethod::Gemm).unwrap();
        prop_assert_eq!(index.method(), NeighbourMethod::Gemm);
        let want = reference(&pts, dim, n, standardise);
        prop_assert_eq!(index.table(), &want[..]);
    }
}

#[test]
fn gemm_certifies_high_dimensional_data_without_fallback() {
    // Uniform points: the rounding bound is far below the neighbour gaps, so
    // no row should need brute force.
    for dim in [14, 35, 62, 70] {
        let len = 1500;
        let pts = make_points(Kind::Uniform, len, dim, 7 + dim as u64);
        let index =
            NeighbourIndex::build_with(&pts, dim, 5, &NeighbourOptions::default(), NeighbourMethod::Gemm).unwrap();
        assert_eq!(index.table(), &reference(&pts, dim, 5, false)[..], "dim {dim}");
        assert_eq!(index.exact_fallbacks(), 0, "dim {dim}");
    }
}

#[test]
fn auto_picks_the_tree_for_trajectories_and_gemm_for_noise() {
    let opts = NeighbourOptions::default();
    let walk = make_points(Kind::Trajectory, 2000, 14, 3);
    let noise = make_points(Kind::Uniform, 2000, 14, 3);
    let (e_walk, e_noise) =
        (effective_dimension(&walk, 14, &opts).unwrap(), effective_dimension(&noise, 14, &opts).unwrap());
    assert!(e_walk < ddppo_buffer::TREE_MAX_EFFECTIVE_DIM, "walk: {e_walk}");
    assert!(e_noise > 8.0, "uniform 14-D: {e_noise}");
    assert_eq!(NeighbourIndex::build(&walk, 14, 5, &opts).unwrap().method(), NeighbourMethod::Tree);
    assert_eq!(NeighbourIndex::build(&noise, 14, 5, &opts).unwrap().method(), NeighbourMethod::Gemm);
    // Past the widest tree, auto uses the GEMM.
    let wide = make_points(Kind::Trajectory, 300, ddppo_buffer::MAX_TREE_WIDTH + 1, 3);
    let ix = NeighbourIndex::build(&wide, ddppo_buffer::MAX_TREE_WIDTH + 1, 5, &opts).unwrap();
    assert_eq!(ix.method(), NeighbourMethod::Gemm);
}

#[test]
fn effective_dimension_of_a_line_and_a_cube() {
    let opts = NeighbourOptions::default();
    // Points on a line embedded in 5-D: dimension 1.
    let line: Vec<f32> = (0..3000)
        .flat_map(|t| {
            let t = t as f32 * 0.01;
            [t, 2.0 * t, -t, 0.5 * t, 0.0]
        })
        .collect();
    let e = effective_dimension(&line, 5, &opts).unwrap();
    assert!((e - 1.0).abs() < 0.3, "line: {e}");
    // Uniform in a 3-D cube: about 3.
    let cube = make_points(Kind::Uniform, 5000, 3, 1);
    let e = effective_dimension(&cube, 3, &opts).unwrap();
    assert!((e - 3.0).abs() < 0.8, "cube: {e}");
    assert!(matches!(effective_dimension(&[1.0f32, 2.0], 2, &opts), Err(Error::TooFewPoints { .. })));
}

#[test]
fn larger_trajectory_sets_match_brute_force() {
    for (dim, n, kind) in
        [(14, 25, Kind::Trajectory), (35, 5, Kind::Clipped), (62, 5, Kind::Trajectory), (23, 25, Kind::NearDuplicates)]
    {
        let len = 2000;
        let pts = make_points(kind, len, dim, dim as u64);
        for standardise in [false, true] {
            let opts = NeighbourOptions { standardise };
            let want = reference(&pts, dim, n, standardise);
            for method in [NeighbourMethod::Tree, NeighbourMethod::Gemm, NeighbourMethod::Auto] {
                let index = NeighbourIndex::build_with(&pts, dim, n, &opts, method).unwrap();
                assert_eq!(index.table(), &want[..], "dim {dim} {kind:?} {method:?}");
                // The tree path, not the brute-force fallback, must answer
                // (near-duplicate data may legitimately need the fallback).
                if method == NeighbourMethod::Tree && !matches!(kind, Kind::NearDuplicates) {
                    assert!(index.exact_fallbacks() < len / 50, "{kind:?}: {} fallbacks", index.exact_fallbacks());
                }
            }
        }
    }
}

#[test]
fn all_points_identical_gives_smallest_other_indices() {
    let pts = vec![0.5f32; 50 * 4];
    for method in [NeighbourMethod::Auto, NeighbourMethod::Tree, NeighbourMethod::Gemm] {
        let index = NeighbourIndex::build_with(&pts, 4, 3, &NeighbourOptions::default(), method).unwrap();
        assert_eq!(index.neighbours(0), &[1, 2, 3]);
        assert_eq!(index.neighbours(2), &[0, 1, 3]);
        assert_eq!(index.neighbours(49), &[0, 1, 2]);
    }
}

#[test]
fn ties_are_broken_by_the_smaller_index() {
    // Point 2 at the origin; 0, 1, 3, 4 all at distance 1.
    let pts = [1.0f32, 0.0, 0.0, 1.0, 0.0, 0.0, -1.0, 0.0, 0.0, -1.0, 5.0, 5.0];
    for method in [NeighbourMethod::Auto, NeighbourMethod::Tree, NeighbourMethod::Gemm] {
        let index = NeighbourIndex::build_with(&pts, 2, 3, &NeighbourOptions::default(), method).unwrap();
        assert_eq!(index.neighbours(2), &[0, 1, 3], "{method:?}");
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let opts = NeighbourOptions::default();
    let pts = [0.0f32; 12];
    assert!(matches!(NeighbourIndex::build(&pts, 0, 1, &opts), Err(Error::ZeroDim)));
    assert!(matches!(NeighbourIndex::build(&pts, 5, 1, &opts), Err(Error::RaggedPoints { len: 12, dim: 5 })));
    assert!(matches!(NeighbourIndex::build(&pts, 3, 0, &opts), Err(Error::ZeroNeighbours)));
    assert!(matches!(NeighbourIndex::build(&pts, 3, 4, &opts), Err(Error::TooFewPoints { n: 4, points: 4 })));
    let mut bad = pts;
    bad[7] = f32::NAN;
    let err = NeighbourIndex::build(&bad, 3, 1, &opts).unwrap_err();
    assert!(matches!(err, Error::NonFinitePoint { row: 2, col: 1, .. }));
    assert_eq!(err.to_string(), "point 2 has a non-finite coordinate NaN in column 1");
    bad[7] = f32::INFINITY;
    assert!(matches!(NeighbourIndex::build(&bad, 3, 1, &opts), Err(Error::NonFinitePoint { .. })));
    assert_eq!(
        NeighbourIndex::build(&pts, 3, 4, &opts).unwrap_err().to_string(),
        "n = 4 neighbours need at least n + 1 = 5 points, got 4"
    );
}

#[test]
fn standardising_changes_the_metric() {
    // Column 1 has a huge scale: raw search follows it, z-scored search does not.
    let pts = [0.0f32, 0.0, 0.1, 1000.0, 1.0, 0.0, 0.2, 3000.0];
    let raw = NeighbourIndex::build(&pts, 2, 1, &NeighbourOptions { standardise: false }).unwrap();
    assert_eq!(raw.neighbours(0), &[2]);
    let z = NeighbourIndex::build(&pts, 2, 1, &NeighbourOptions { standardise: true }).unwrap();
    assert_eq!(z.neighbours(0), &[1]);
}
