//! Exact `n`-nearest-neighbour table over a fixed point set (ALGORITHM.md
//! section 3: the neighbour set of the directional-derivative loss).
//!
//! How the table is computed, and why it is exact:
//!
//! 1. The search coordinates `c` are the raw points in `f64` (the reference's
//!    choice) or, with [`NeighbourOptions::standardise`], the z-scored points.
//!    The metric that defines "nearest" is [`exact_sq_dist`] on `c`; the
//!    brute-force baseline ([`brute_force_neighbours`]) uses the same function.
//! 2. kiddo splits dimensions in cyclic order and at N = 10,000 a tree has
//!    only ~9 levels, so only the first ~9 columns ever prune. DDPPO's inputs
//!    `(s, a)` put small, low-variance columns anywhere, so the points are
//!    centred and rotated onto their principal axes (largest variance first)
//!    before the tree is built. The rotation is orthogonal and not whitened:
//!    distances are unchanged up to float rounding.
//! 3. The tree returns `n + 1 + OVERFETCH` candidates per point in rotated
//!    space; they are re-ranked with [`exact_sq_dist`] in `c` and ties broken
//!    by the smaller index. The result is accepted only when the `n`-th exact
//!    distance is below the tree's last candidate distance minus a rigorous
//!    bound on the rotation's rounding error; otherwise that point is
//!    recomputed by brute force. So the table equals brute force exactly.
use std::num::NonZeroUsize;

use kiddo::{ImmutableKdTree, SquaredEuclidean};
use rayon::prelude::*;

use crate::distance::{brute_force_row, exact_sq_dist};
use crate::{Error, Result};

/// How [`NeighbourIndex::build`] searches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NeighbourOptions {
    /// Search in z-scored `x` (each column minus its mean, over its standard
    /// deviation; a deviation below 1e-12 counts as 1). Default `false`:
    /// raw `x`, as the reference implementation does.
    pub standardise: bool,
}

/// Which search [`NeighbourIndex::build_with`] runs. Every method returns the
/// same, exact table; they differ only in speed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NeighbourMethod {
    /// Choose from the data (see [`NeighbourIndex::build`]).
    #[default]
    Auto,
    /// PCA-rotated kiddo k-d tree with exact re-rank; widths above
    /// [`MAX_TREE_WIDTH`] use exhaustive search.
    Tree,
    /// Blocked f32 GEMM distances (`|q|^2 + |p|^2 - 2 q.p`) with exact
    /// re-rank and a rigorous rounding bound.
    Gemm,
}

/// Extra candidates fetched from the tree beyond `n + 1` (the point itself),
/// so that the exactness check of the re-rank rarely fails. One suffices:
/// the check only needs a gap above the rounding bound between the n-th and
/// the last candidate; more cost query time (measured: 3 was slower, and the
/// fallback count stayed 0 on all benchmark data with 1).
const OVERFETCH: usize = 1;

/// For every point of a set, its `n` nearest other points (squared Euclidean).
#[derive(Clone, Debug)]
pub struct NeighbourIndex {
    len: usize,
    n: usize,
    table: Vec<u32>,
    exact_fallbacks: usize,
    method: NeighbourMethod,
}

impl NeighbourIndex {
    /// `points`: N x dim row-major. For every point its n nearest (squared
    /// Euclidean), itself excluded; ties broken by the smaller index.
    ///
    /// Errors: `dim == 0`, a length that is not a multiple of `dim`, `n == 0`,
    /// `n >= N`, more than `u32::MAX` points, or a non-finite coordinate.
    /// Runs on the current rayon thread pool (all cores by default; wrap the
    /// call in `ThreadPool::install` to choose the thread count).
    ///
    /// The search method is chosen from the data ([`NeighbourMethod::Auto`]):
    /// the k-d tree when the points are locally low-dimensional
    /// ([`effective_dimension`] below [`TREE_MAX_EFFECTIVE_DIM`], e.g. smooth
    /// trajectories), otherwise the blocked GEMM (e.g. replay data with
    /// uniform random actions, where a tree scans most leaves); always the
    /// GEMM above [`MAX_TREE_WIDTH`]. Both are exact.
    pub fn build(points: &[f32], dim: usize, n: usize, opts: &NeighbourOptions) -> Result<Self> {
        Self::build_with(points, dim, n, opts, NeighbourMethod::Auto)
    }

    /// [`NeighbourIndex::build`] with a chosen search method (same table for
    /// every method; for tests and benchmarks).
    pub fn build_with(
        points: &[f32],
        dim: usize,
        n: usize,
        opts: &NeighbourOptions,
        method: NeighbourMethod,
    ) -> Result<Self> {
        let len = validate(points, dim, n)?;
        let coords = search_coords(points, dim, opts.standardise);
        let mean = column_mean(&coords, dim);
        let (table, exact_fallbacks, method) = match method {
            NeighbourMethod::Gemm => {
                let (t, f) = crate::gemm_search::gemm_neighbours(&coords, &mean, dim, len, n);
                (t, f, NeighbourMethod::Gemm)
            }
            NeighbourMethod::Tree => {
                let (t, f) = tree_or_brute(&coords, &mean, dim, len, n, None);
                (t, f, NeighbourMethod::Tree)
            }
            NeighbourMethod::Auto => {
                if dim > MAX_TREE_WIDTH {
                    let (t, f) = crate::gemm_search::gemm_neighbours(&coords, &mean, dim, len, n);
                    (t, f, NeighbourMethod::Gemm)
                } else {
                    if local_intrinsic_dimension(&coords, dim, len) < TREE_MAX_EFFECTIVE_DIM {
                        let (t, f) = tree_or_brute(&coords, &mean, dim, len, n, None);
                        (t, f, NeighbourMethod::Tree)
                    } else {
                        let (t, f) = crate::gemm_search::gemm_neighbours(&coords, &mean, dim, len, n);
                        (t, f, NeighbourMethod::Gemm)
                    }
                }
            }
        };
        Ok(Self { len, n, table, exact_fallbacks, method })
    }

    /// The method that computed the table ([`NeighbourMethod::Tree`] or
    /// [`NeighbourMethod::Gemm`], never `Auto`).
    pub fn method(&self) -> NeighbourMethod {
        self.method
    }

    /// Number of points N.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an index holds at least `n + 1 >= 2` points.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Neighbours per point.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The N x n table, row-major; row `i` holds the neighbours of point `i`,
    /// nearest first.
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// The neighbours of point `i`, nearest first. Panics if `i >= len()`.
    pub fn neighbours(&self, i: usize) -> &[u32] {
        &self.table[i * self.n..(i + 1) * self.n]
    }

    /// How many points the tree or GEMM pass could not certify (near-ties at
    /// the candidate boundary, e.g. many exact duplicates) and were
    /// recomputed by brute force.
    pub fn exact_fallbacks(&self) -> usize {
        self.exact_fallbacks
    }
}

/// Reference implementation: the same table by exhaustive search,
/// O(N^2 dim), parallel over points. Same errors as [`NeighbourIndex::build`].
pub fn brute_force_neighbours(points: &[f32], dim: usize, n: usize, opts: &NeighbourOptions) -> Result<Vec<u32>> {
    let len = validate(points, dim, n)?;
    let coords = search_coords(points, dim, opts.standardise);
    Ok(brute_force_table(&coords, dim, len, n))
}

/// The effective dimension that [`NeighbourMethod::Auto`] decides by: a
/// local intrinsic dimension, the maximum-likelihood estimate
/// `1 / mean_i( (1/(k-1)) sum_{j<k} ln(r_k(i) / r_j(i)) )` (Levina and
/// Bickel 2004, aggregated as MacKay and Ghahramani) over
/// [`LID_SAMPLES`] evenly spaced query points, `r_j(i)` the distance to the
/// j-th nearest other point, `k = min(20, N - 1)`. About 1 along smooth
/// trajectories, about `dim` for uniform noise. Same errors as
/// [`NeighbourIndex::build`] with `n = 1`.
pub fn effective_dimension(points: &[f32], dim: usize, opts: &NeighbourOptions) -> Result<f64> {
    let len = validate(points, dim, 1)?;
    let coords = search_coords(points, dim, opts.standardise);
    Ok(local_intrinsic_dimension(&coords, dim, len))
}

/// Query points sampled by [`effective_dimension`].
pub const LID_SAMPLES: usize = 32;

fn local_intrinsic_dimension(coords: &[f64], dim: usize, len: usize) -> f64 {
    let k = 20.min(len - 1);
    let samples = LID_SAMPLES.min(len);
    let inv: Vec<f64> = (0..samples)
        .into_par_iter()
        .filter_map(|s| {
            let i = s * len / samples;
            let q = &coords[i * dim..(i + 1) * dim];
            let mut d: Vec<f64> = coords
                .chunks_exact(dim)
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, row)| exact_sq_dist(q, row))
                .filter(|&v| v > 0.0)
                .collect();
            if d.len() < k || k < 2 {
                return None;
            }
            d.select_nth_unstable_by(k - 1, f64::total_cmp);
            let rk = d[k - 1];
            let sum: f64 = d[..k - 1].iter().map(|&dj| 0.5 * (rk / dj).ln()).sum();
            Some(sum / (k - 1) as f64)
        })
        .collect();
    let mean_inv = inv.iter().sum::<f64>() / inv.len().max(1) as f64;
    if mean_inv > 0.0 { 1.0 / mean_inv } else { 0.0 }
}

fn validate(points: &[f32], dim: usize, n: usize) -> Result<usize> {
    if dim == 0 {
        return Err(Error::ZeroDim);
    }
    if !points.len().is_multiple_of(dim) {
        return Err(Error::RaggedPoints { len: points.len(), dim });
    }
    let len = points.len() / dim;
    if n == 0 {
        return Err(Error::ZeroNeighbours);
    }
    if n >= len {
        return Err(Error::TooFewPoints { n, points: len });
    }
    if len > u32::MAX as usize {
        return Err(Error::TooManyPoints { points: len });
    }
    if let Some(pos) = points.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinitePoint { row: pos / dim, col: pos % dim, value: points[pos] });
    }
    Ok(len)
}

/// Search coordinates in `f64`: raw, or z-scored per column.
fn search_coords(points: &[f32], dim: usize, standardise: bool) -> Vec<f64> {
    let mut c: Vec<f64> = points.iter().map(|&v| f64::from(v)).collect();
    if standardise {
        let len = c.len() / dim;
        let mean = column_mean(&c, dim);
        let mut var = vec![0.0; dim];
        for row in c.chunks_exact(dim) {
            for ((v, x), m) in var.iter_mut().zip(row).zip(&mean) {
                *v += (x - m) * (x - m);
            }
        }
        // Same rule as the models' input scaler (ALGORITHM.md section 2).
        let std: Vec<f64> = var
            .iter()
            .map(|v| {
                let s = (v / len as f64).sqrt();
                if s < 1e-12 { 1.0 } else { s }
            })
            .collect();
        for row in c.chunks_exact_mut(dim) {
            for ((x, m), s) in row.iter_mut().zip(&mean).zip(&std) {
                *x = (*x - m) / s;
            }
        }
    }
    c
}

pub(crate) fn column_mean(c: &[f64], dim: usize) -> Vec<f64> {
    let len = c.len() / dim;
    let mut mean = vec![0.0; dim];
    for row in c.chunks_exact(dim) {
        for (m, x) in mean.iter_mut().zip(row) {
            *m += x;
        }
    }
    for m in &mut mean {
        *m /= len as f64;
    }
    mean
}

fn brute_force_table(coords: &[f64], dim: usize, len: usize, n: usize) -> Vec<u32> {
    let mut table = vec![0u32; len * n];
    table
        .par_chunks_mut(n)
        .enumerate()
        .for_each_init(Vec::new, |scratch, (i, out)| brute_force_row(coords, dim, i, n, scratch, out));
    table
}

// ---------------------------------------------------------------------------
// Principal-axis rotation.

/// Orthogonal matrix `v` (dim x dim, row-major, columns = principal axes,
/// largest variance first) from the covariance of (a subsample of) `coords`.
fn principal_axes(coords: &[f64], dim: usize, mean: &[f64]) -> Vec<f64> {
    let len = coords.len() / dim;
    // Any orthogonal matrix keeps the result exact; the axes only need to be
    // good enough to make the tree prune, so a subsample suffices.
    let stride = len.div_ceil(4096).max(1);
    let mut cov = vec![0.0; dim * dim];
    let mut w = vec![0.0; dim];
    let mut count = 0usize;
    for row in coords.chunks_exact(dim).step_by(stride) {
        for ((wk, x), m) in w.iter_mut().zip(row).zip(mean) {
            *wk = x - m;
        }
        for a in 0..dim {
            let wa = w[a];
            let cov_row = &mut cov[a * dim..(a + 1) * dim];
            for (cb, wb) in cov_row[a..].iter_mut().zip(&w[a..]) {
                *cb += wa * wb;
            }
        }
        count += 1;
    }
    for a in 0..dim {
        for b in a..dim {
            let v = cov[a * dim + b] / count as f64;
            cov[a * dim + b] = v;
            cov[b * dim + a] = v;
        }
    }
    let (eigenvalues, vectors) = jacobi_eigen(cov, dim);
    let mut order: Vec<usize> = (0..dim).collect();
    order.sort_by(|&a, &b| eigenvalues[b].total_cmp(&eigenvalues[a]).then(a.cmp(&b)));
    let mut sorted = vec![0.0; dim * dim];
    for (new_col, &old_col) in order.iter().enumerate() {
        for r in 0..dim {
            sorted[r * dim + new_col] = vectors[r * dim + old_col];
        }
    }
    sorted
}

/// [`NeighbourMethod::Auto`] takes the tree below this
/// [`effective_dimension`] and the GEMM at or above it. Calibrated on the
/// benchmark data (N = 10,000, one thread; see benches/neighbours.rs): the
/// tree's cost grows steeply with the local dimension, the GEMM's does not.
pub const TREE_MAX_EFFECTIVE_DIM: f64 = 4.0;

/// Cyclic Jacobi eigen-decomposition of a symmetric matrix (row-major).
/// Returns the eigenvalues and the eigenvectors as the columns of an
/// orthogonal matrix. Each step is a Givens rotation, so the accumulated
/// matrix stays orthogonal to rounding whether or not it has converged.
pub(crate) fn jacobi_eigen(mut a: Vec<f64>, dim: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; dim * dim];
    for k in 0..dim {
        v[k * dim + k] = 1.0;
    }
    for _sweep in 0..50 {
        let off: f64 = (0..dim)
            .flat_map(|p| (p + 1..dim).map(move |q| (p, q)))
            .map(|(p, q)| a[p * dim + q] * a[p * dim + q])
            .sum();
        let diag: f64 = (0..dim).map(|p| a[p * dim + p] * a[p * dim + p]).sum();
        if off <= 1e-30 * diag || off == 0.0 {
            break;
        }
        for p in 0..dim {
            for q in p + 1..dim {
                let apq = a[p * dim + q];
                if apq == 0.0 {
                    continue;
                }
                // Choose the rotation J (J_pp = J_qq = c, J_pq = s, J_qp = -s)
                // that zeroes (J^T A J)_pq: t^2 + 2 theta t - 1 = 0, smaller root.
                let theta = (a[q * dim + q] - a[p * dim + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..dim {
                    let (x, y) = (a[k * dim + p], a[k * dim + q]);
                    a[k * dim + p] = c * x - s * y;
                    a[k * dim + q] = s * x + c * y;
                }
                for k in 0..dim {
                    let (x, y) = (a[p * dim + k], a[q * dim + k]);
                    a[p * dim + k] = c * x - s * y;
                    a[q * dim + k] = s * x + c * y;
                }
                a[p * dim + q] = 0.0;
                a[q * dim + p] = 0.0;
                for k in 0..dim {
                    let (x, y) = (v[k * dim + p], v[k * dim + q]);
                    v[k * dim + p] = c * x - s * y;
                    v[k * dim + q] = s * x + c * y;
                }
            }
        }
    }
    let eigenvalues = (0..dim).map(|k| a[k * dim + k]).collect();
    (eigenvalues, v)
}

// ---------------------------------------------------------------------------
// Tree search.

/// Widths of the kiddo trees compiled in. A point set of width `dim` uses the
/// smallest width `>= dim`, padded with zero columns (zeros change no
/// distance). Every width 1..=16 exists, and every DDPPO width (obs + act:
/// 3, 5, 14, 23, 35, 62) exactly; wider points use the brute-force path.
macro_rules! tree_widths {
    ($mac:ident) => {
        $mac! { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 23, 24, 28, 32, 35, 40, 44, 48, 56, 62, 64 }
    };
}

macro_rules! max_width {
    ($($k:literal),*) => {
        [$($k),*][[$($k),*].len() - 1]
    };
}
/// The widest tree compiled in.
pub const MAX_TREE_WIDTH: usize = tree_widths!(max_width);

/// Per point: the ids of the `kq` nearest in rotated space (fewer if N < kq)
/// and the largest rotated distance among them.
struct Candidates {
    kq: usize,
    ids: Vec<u32>,
    count: Vec<u32>,
    last_dist: Vec<f64>,
}

fn tree_candidates<const K: usize>(rotated: &[f64], dim: usize, len: usize, kq: usize) -> Candidates {
    let padded: Vec<[f64; K]> = rotated
        .chunks_exact(dim)
        .map(|row| {
            let mut p = [0.0; K];
            p[..dim].copy_from_slice(row);
            p
        })
        .collect();
    let tree: ImmutableKdTree<f64, K> = match ImmutableKdTree::new_from_slice(&padded) {
        Ok(t) => t,
        // Only auto-generated u32 ids can fail to fit, which `validate` rules out.
        Err(e) => unreachable!("kiddo construction failed after validation: {e}"),
    };
    let kq_nz = NonZeroUsize::new(kq).unwrap_or(NonZeroUsize::MIN);
    let mut ids = vec![0u32; len * kq];
    let mut count = vec![0u32; len];
    let mut last_dist = vec![0.0f64; len];
    ids.par_chunks_mut(kq).zip(count.par_iter_mut()).zip(last_dist.par_iter_mut()).zip(padded.par_iter()).for_each(
        |(((out, cnt), last), q)| {
            let found = tree.query(q).nearest_n::<SquaredEuclidean<f64>>(kq_nz).execute();
            *cnt = found.len() as u32;
            *last = found.iter().map(|r| r.distance).fold(0.0, f64::max);
            for (o, r) in out.iter_mut().zip(&found) {
                *o = r.item;
            }
        },
    );
    Candidates { kq, ids, count, last_dist }
}

macro_rules! dispatch_tree {
    ($($k:literal),*) => {
        fn candidates_for_width(rotated: &[f64], dim: usize, len: usize, kq: usize) -> Candidates {
            $(
                if dim <= $k {
                    return tree_candidates::<$k>(rotated, dim, len, kq);
                }
            )*
            unreachable!("dimension {dim} above MAX_TREE_WIDTH reached the tree path")
        }
    };
}
tree_widths!(dispatch_tree);

/// The tree path, or exhaustive search for widths without a tree.
fn tree_or_brute(
    coords: &[f64],
    mean: &[f64],
    dim: usize,
    len: usize,
    n: usize,
    axes: Option<Vec<f64>>,
) -> (Vec<u32>, usize) {
    if dim <= MAX_TREE_WIDTH {
        let axes = axes.unwrap_or_else(|| principal_axes(coords, dim, mean));
        tree_neighbours(coords, mean, &axes, dim, len, n)
    } else {
        (brute_force_table(coords, dim, len, n), 0)
    }
}

fn tree_neighbours(coords: &[f64], mean: &[f64], axes: &[f64], dim: usize, len: usize, n: usize) -> (Vec<u32>, usize) {
    let eps = f64::EPSILON;

    // y = V^T (c - mean), one row per point.
    let mut rotated = vec![0.0; len * dim];
    let max_norm_sq = rotated
        .par_chunks_mut(dim)
        .zip(coords.par_chunks(dim))
        .map_init(
            || vec![0.0; dim],
            |w, (y, c)| {
                for ((wk, x), m) in w.iter_mut().zip(c).zip(mean) {
                    *wk = x - m;
                }
                y.fill(0.0);
                for (l, wl) in w.iter().enumerate() {
                    let axis_row = &axes[l * dim..(l + 1) * dim];
                    for (yk, vlk) in y.iter_mut().zip(axis_row) {
                        *yk += vlk * wl;
                    }
                }
                w.iter().map(|v| v * v).sum::<f64>()
            },
        )
        .reduce(|| 0.0, f64::max);

    // Rigorous bound on |rotated distance - exact distance| for any pair.
    // With v = c_i - c_j, |v| <= 2M (M the largest centred norm):
    //  - non-orthogonality of V: | |V^T v|^2 - |v|^2 | <= ||V V^T - I||_2 |v|^2,
    //    ||.||_2 bounded by dim * max entry;
    //  - rounding in y = V^T w: per point |e| <= dim^1.5 eps |w| (plus eps |w|
    //    from centring), so | |u + e|^2 - |u|^2 | <= 2|u||e| + |e|^2;
    //  - rounding of both distance sums (kiddo's and exact_sq_dist): dim eps d each.
    // Then a safety factor of 8.
    let mut orth = 0.0f64;
    for a in 0..dim {
        for b in 0..dim {
            let dot: f64 = (0..dim).map(|r| axes[a * dim + r] * axes[b * dim + r]).sum();
            let target = if a == b { 1.0 } else { 0.0 };
            orth = orth.max((dot - target).abs());
        }
    }
    let d = dim as f64;
    let m = max_norm_sq.sqrt();
    let e = 2.0 * (d.powf(1.5) + 1.0) * eps * m;
    let v2 = 4.0 * max_norm_sq;
    let slack = 8.0 * (d * orth * v2 + 2.0 * (2.0 * m) * e + e * e + 2.0 * d * eps * (2.0 * m + e).powi(2));

    let kq = (n + 1 + OVERFETCH).min(len);
    let cand = candidates_for_width(&rotated, dim, len, kq);

    let mut table = vec![0u32; len * n];
    let fallbacks: usize = table
        .par_chunks_mut(n)
        .enumerate()
        .map_init(Vec::new, |scratch: &mut Vec<(f64, u32)>, (i, out)| {
            let count = cand.count[i] as usize;
            let ids = &cand.ids[i * cand.kq..i * cand.kq + count];
            let q = &coords[i * dim..(i + 1) * dim];
            scratch.clear();
            scratch.extend(
                ids.iter()
                    .filter(|&&j| j as usize != i)
                    .map(|&j| (exact_sq_dist(q, &coords[j as usize * dim..(j as usize + 1) * dim]), j)),
            );
            scratch.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            // Every point is a candidate when the tree returned all N of them.
            let all_seen = count == len;
            let certified = scratch.len() >= n && (all_seen || scratch[n - 1].0 < cand.last_dist[i] - slack);
            if certified {
                for (o, &(_, j)) in out.iter_mut().zip(scratch.iter()) {
                    *o = j;
                }
                0usize
            } else {
                brute_force_row(coords, dim, i, n, scratch, out);
                1
            }
        })
        .sum();
    (table, fallbacks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_diagonalises_and_stays_orthogonal() {
        let dim = 7;
        // A symmetric matrix with known structure: B^T B for a fixed B.
        let b: Vec<f64> = (0..dim * dim).map(|k| ((k * 37 % 11) as f64 - 5.0) * 0.3).collect();
        let mut a = vec![0.0; dim * dim];
        for i in 0..dim {
            for j in 0..dim {
                a[i * dim + j] = (0..dim).map(|r| b[r * dim + i] * b[r * dim + j]).sum();
            }
        }
        let (vals, v) = jacobi_eigen(a.clone(), dim);
        for c in 0..dim {
            // A v_c = lambda_c v_c
            for r in 0..dim {
                let av: f64 = (0..dim).map(|k| a[r * dim + k] * v[k * dim + c]).sum();
                assert!((av - vals[c] * v[r * dim + c]).abs() < 1e-9, "column {c} row {r}");
            }
            for c2 in 0..dim {
                let dot: f64 = (0..dim).map(|r| v[r * dim + c] * v[r * dim + c2]).sum();
                let want = if c == c2 { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn dispatch_covers_every_width_up_to_the_maximum() {
        // Small random sets in every width 1..=MAX_TREE_WIDTH + 2 against brute force.
        let len = 60;
        for dim in 1..=MAX_TREE_WIDTH + 2 {
            let pts: Vec<f32> = (0..len * dim).map(|k| ((k * 7919 + dim * 31) % 1000) as f32 / 997.0).collect();
            let bf = brute_force_neighbours(&pts, dim, 4, &NeighbourOptions::default()).unwrap();
            for method in [NeighbourMethod::Tree, NeighbourMethod::Gemm] {
                let idx = NeighbourIndex::build_with(&pts, dim, 4, &NeighbourOptions::default(), method).unwrap();
                assert_eq!(idx.table(), &bf[..], "dim {dim} {method:?}");
            }
        }
    }
}
