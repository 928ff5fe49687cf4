//! The exact metric that defines "nearest" and the brute-force search of one
//! point's neighbours: the ground truth that both searches of
//! [`crate::NeighbourIndex`] (the k-d tree in `neighbours`, the GEMM screen
//! in `gemm_search`) re-rank their candidates with or fall back to.

/// The metric that defines "nearest": squared Euclidean distance of two rows
/// of search coordinates, summed in order in `f64`.
#[inline]
pub fn exact_sq_dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// The `n` nearest of point `i` among all points, by (distance, index).
pub(crate) fn brute_force_row(
    coords: &[f64],
    dim: usize,
    i: usize,
    n: usize,
    scratch: &mut Vec<(f64, u32)>,
    out: &mut [u32],
) {
    let q = &coords[i * dim..(i + 1) * dim];
    scratch.clear();
    scratch.extend(
        coords.chunks_exact(dim).enumerate().filter(|&(j, _)| j != i).map(|(j, row)| (exact_sq_dist(q, row), j as u32)),
    );
    let by_dist_then_index = |a: &(f64, u32), b: &(f64, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    if scratch.len() > n {
        scratch.select_nth_unstable_by(n - 1, by_dist_then_index);
        scratch.truncate(n);
    }
    scratch.sort_unstable_by(by_dist_then_index);
    for (o, &(_, j)) in out.iter_mut().zip(scratch.iter()) {
        *o = j;
    }
}
