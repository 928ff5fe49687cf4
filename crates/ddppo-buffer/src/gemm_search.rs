//! Exact `n`-nearest neighbours by blocked f32 GEMM ([`NeighbourMethod::Gemm`]).
//!
//! 1. Centre the search coordinates in `f64` (`w = c - mean`: it shrinks the
//!    norms and so the cancellation in `|q|^2 + |p|^2 - 2 q.p`), scale by a
//!    power of two so that `max |w| <= 1` (exact; keeps f32 far from
//!    overflow and underflow), round to f32 (`x`).
//! 2. For a block of query rows and a tile of columns, one f32 GEMM gives
//!    `-2 x_i.x_j`; adding `p_j = (1 - c) |x_j|^2` gives the selection key
//!    `key_ij`, and `L_ij = (1 - c) |w_i|^2 + key_ij` is a rigorous *lower*
//!    bound on the squared distance (derivation at [`rounding_factor`]).
//!    Each row keeps its `n + EXTRA` smallest keys in a small sorted array
//!    (a 16-wide minimum is checked against the row's threshold first, so
//!    the array is touched rarely).
//! 3. The candidates are re-ranked with [`exact_sq_dist`] in the original
//!    coordinates, ties by the smaller index. Every non-candidate `j` has
//!    `key_ij >= t` (the row's final threshold only ever decreases), so its
//!    exact distance is at least `(1 - c)|w_i|^2 + t`; when the n-th exact
//!    distance is strictly below that, the row is certified. Otherwise the
//!    row is recomputed by brute force. So the table equals brute force.
//!
//! [`NeighbourMethod::Gemm`]: crate::NeighbourMethod::Gemm
//! [`exact_sq_dist`]: crate::exact_sq_dist
use rayon::prelude::*;

use crate::distance::{brute_force_row, exact_sq_dist};

/// Candidates kept per row beyond `n`: the certificate needs a gap above
/// the rounding bound between the n-th distance and the last candidate's
/// lower bound.
const EXTRA: usize = 4;
/// Query rows per task (one GEMM's m).
const ROW_BLOCK: usize = 128;
/// Columns per GEMM tile: the 128 x 2048 f32 result (1 MiB) stays in L2.
const COL_TILE: usize = 2048;
/// Absolute slack (in the scaled units where `max |w| <= 1`) for f32
/// underflow: each gradual-underflow rounding is below 2^-149 ~ 1.4e-45 and a
/// distance sees at most a few hundred of them.
const UNDERFLOW_SLACK: f64 = 1e-30;

/// The factor `c` with `|key_ij - ((1 - c)|w_j|^2 - 2 w_i.w_j)| <= c/4 (|w_i|^2 + |w_j|^2)`
/// (scaled units), so that `L_ij <= |w_i - w_j|^2` with a 4x margin.
///
/// With `u = 2^-24` (f32 unit roundoff), `S = |w_i|^2 + |w_j|^2` and
/// `|w_i||w_j| <= S/2`, the rounding errors of the key are:
/// - `x = fl32(w)`, `|x - w| <= u|w|` per coordinate: the dot product moves by
///   at most `(2u + u^2)|w_i||w_j| <= 1.01 u S`;
/// - the f32 dot product of `dim` terms in any order, FMA or not:
///   `gamma_dim |x_i||x_j| <= 0.51 dim u S` (Higham, eq. 3.5), doubled by `-2`
///   (exact): `1.02 dim u S`; with the first item, `-2 x_i.x_j` is off by
///   at most `(dim + 2) 1.02 u S`;
/// - `p_j = fl32((1 - c) |x_j|^2)` with the norm summed in f64: `|x_j|^2`
///   is off `|w_j|^2` by `(2u + u^2)|w_j|^2`, the rounding adds `u`: `3.1 u S`;
/// - the final f32 addition: `u (|p_j| + 2|x_i.x_j|) <= 2.1 u S`.
///
/// In total at most `(dim + 8) u S` (the f64 parts, centring and the f64
/// distance sums, are ~1e-16 relative and vanish in the margin). So
/// `c = 4 (dim + 16) u = 2 (dim + 16) eps_f32` is safe by more than 4x.
pub(crate) fn rounding_factor(dim: usize) -> f64 {
    2.0 * (dim as f64 + 16.0) * f64::from(f32::EPSILON)
}

/// Per row: up to `k` (key, id) pairs, ascending by key.
struct Best<'a> {
    keys: &'a mut [f32],
    ids: &'a mut [u32],
    count: usize,
}

impl Best<'_> {
    /// The key a new candidate must beat (infinite until full).
    #[inline]
    fn threshold(&self) -> f32 {
        if self.count < self.keys.len() { f32::INFINITY } else { self.keys[self.count - 1] }
    }

    /// Insert (caller checked `key < threshold()`); the largest falls out when full.
    #[inline]
    fn insert(&mut self, key: f32, id: u32) {
        let k = self.keys.len();
        let mut pos = if self.count < k {
            self.count += 1;
            self.count - 1
        } else {
            k - 1
        };
        while pos > 0 && self.keys[pos - 1] > key {
            self.keys[pos] = self.keys[pos - 1];
            self.ids[pos] = self.ids[pos - 1];
            pos -= 1;
        }
        self.keys[pos] = key;
        self.ids[pos] = id;
    }
}

/// Scan one row of a tile: `dots[t] = -2 x_i.x_{c0+t}`, `p[t] = p_{c0+t}`.
#[inline]
fn scan_row(best: &mut Best<'_>, dots: &[f32], p: &[f32], c0: usize, self_id: usize) {
    let mut thr = best.threshold();
    const W: usize = 16;
    let full = dots.len() / W * W;
    for (ci, (dc, pc)) in dots[..full].chunks_exact(W).zip(p[..full].chunks_exact(W)).enumerate() {
        let mut keys = [0f32; W];
        let mut mn = f32::INFINITY;
        for t in 0..W {
            let key = pc[t] + dc[t];
            keys[t] = key;
            mn = if key < mn { key } else { mn };
        }
        if mn < thr {
            // Bit mask of the lanes below the threshold, then only those lanes
            // (the threshold can only fall while inserting, so recheck).
            let mut mask = 0u32;
            for (t, &key) in keys.iter().enumerate() {
                mask |= u32::from(key < thr) << t;
            }
            while mask != 0 {
                let t = mask.trailing_zeros() as usize;
                mask &= mask - 1;
                let j = c0 + ci * W + t;
                if keys[t] < thr && j != self_id {
                    best.insert(keys[t], j as u32);
                    thr = best.threshold();
                }
            }
        }
    }
    for t in full..dots.len() {
        let key = p[t] + dots[t];
        let j = c0 + t;
        if key < thr && j != self_id {
            best.insert(key, j as u32);
            thr = best.threshold();
        }
    }
}

/// The exact table and the number of rows that needed the brute-force fallback.
pub(crate) fn gemm_neighbours(coords: &[f64], mean: &[f64], dim: usize, len: usize, n: usize) -> (Vec<u32>, usize) {
    let k = (n + EXTRA).min(len - 1);
    let all_seen = k == len - 1;
    let c = rounding_factor(dim);

    // Centred f64 rows and their squared norms.
    let mut w = vec![0.0f64; len * dim];
    let mut w_norm = vec![0.0f64; len];
    w.par_chunks_mut(dim).zip(coords.par_chunks(dim)).zip(w_norm.par_iter_mut()).for_each(|((wr, cr), nr)| {
        for ((a, b), m) in wr.iter_mut().zip(cr).zip(mean) {
            *a = b - m;
        }
        *nr = wr.iter().map(|v| v * v).sum();
    });
    let max_norm_sq = w_norm.iter().copied().fold(0.0, f64::max);
    // A power of two with max |w| * scale <= 1: multiplying by it is exact.
    let scale = if max_norm_sq > 0.0 { 2f64.powi(-(max_norm_sq.sqrt().log2().ceil() as i32)) } else { 1.0 };
    let scale_sq = scale * scale;

    let x: Vec<f32> = w.iter().map(|&v| (v * scale) as f32).collect();
    drop(w);
    let p: Vec<f32> = x
        .par_chunks(dim)
        .map(|r| {
            let norm: f64 = r.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            ((1.0 - c) * norm) as f32
        })
        .collect();

    struct Scratch {
        dst: Vec<f32>,
        keys: Vec<f32>,
        ids: Vec<u32>,
        counts: Vec<usize>,
        rerank: Vec<(f64, u32)>,
    }
    let new_scratch = || Scratch {
        dst: vec![0.0; ROW_BLOCK * COL_TILE.min(len)],
        keys: vec![0.0; ROW_BLOCK * k],
        ids: vec![0; ROW_BLOCK * k],
        counts: vec![0; ROW_BLOCK],
        rerank: Vec::new(),
    };

    let mut table = vec![0u32; len * n];
    let fallbacks: usize = table
        .par_chunks_mut(ROW_BLOCK * n)
        .enumerate()
        .map_init(new_scratch, |s, (b, out)| {
            let r0 = b * ROW_BLOCK;
            let m = out.len() / n;
            s.counts[..m].fill(0);
            let mut c0 = 0;
            while c0 < len {
                let nc = COL_TILE.min(len - c0);
                // SAFETY: dst holds ROW_BLOCK * min(COL_TILE, len) >= m * nc
                // values, written row-major (row stride nc); lhs reads rows
                // r0..r0+m and rhs rows c0..c0+nc of x (len x dim, row-major),
                // all in bounds; no aliasing between dst and x.
                unsafe {
                    gemm::gemm(
                        m,
                        nc,
                        dim,
                        s.dst.as_mut_ptr(),
                        1,
                        nc as isize,
                        false,
                        x[r0 * dim..].as_ptr(),
                        1,
                        dim as isize,
                        x[c0 * dim..].as_ptr(),
                        dim as isize,
                        1,
                        0.0f32,
                        -2.0f32,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for r in 0..m {
                    let mut best = Best {
                        keys: &mut s.keys[r * k..(r + 1) * k],
                        ids: &mut s.ids[r * k..(r + 1) * k],
                        count: s.counts[r],
                    };
                    scan_row(&mut best, &s.dst[r * nc..(r + 1) * nc], &p[c0..c0 + nc], c0, r0 + r);
                    s.counts[r] = best.count;
                }
                c0 += nc;
            }

            let mut fallbacks = 0usize;
            for (r, row_out) in out.chunks_exact_mut(n).enumerate() {
                let i = r0 + r;
                let count = s.counts[r];
                let q = &coords[i * dim..(i + 1) * dim];
                s.rerank.clear();
                s.rerank.extend(
                    s.ids[r * k..r * k + count]
                        .iter()
                        .map(|&j| (exact_sq_dist(q, &coords[j as usize * dim..(j as usize + 1) * dim]), j)),
                );
                s.rerank.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let certified = count >= n
                    && (all_seen || {
                        let t = f64::from(s.keys[r * k + k - 1]);
                        let lower = (1.0 - c) * w_norm[i] * scale_sq + t - UNDERFLOW_SLACK;
                        s.rerank[n - 1].0 * scale_sq < lower
                    });
                if certified {
                    for (o, &(_, j)) in row_out.iter_mut().zip(s.rerank.iter()) {
                        *o = j;
                    }
                } else {
                    brute_force_row(coords, dim, i, n, &mut s.rerank, row_out);
                    fallbacks += 1;
                }
            }
            fallbacks
        })
        .sum();
    (table, fallbacks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_keeps_the_smallest_sorted() {
        let (mut keys, mut ids) = (vec![0f32; 3], vec![0u32; 3]);
        let mut best = Best { keys: &mut keys, ids: &mut ids, count: 0 };
        for (key, id) in [(5.0, 0), (1.0, 1), (4.0, 2), (3.0, 3), (0.5, 4), (9.0, 5)] {
            if key < best.threshold() {
                best.insert(key, id);
            }
        }
        assert_eq!(best.count, 3);
        assert_eq!(keys, vec![0.5, 1.0, 3.0]);
        assert_eq!(ids, vec![4, 1, 3]);
    }

    #[test]
    fn lower_bound_holds_on_adversarial_pairs() {
        // Pairs far from the centre with tiny separations: L_ij <= exact.
        let dim = 62;
        let c = rounding_factor(dim);
        let mut worst = f64::NEG_INFINITY;
        for s in 0..2000u64 {
            let wi: Vec<f64> =
                (0..dim).map(|k| (((s * 131 + k as u64 * 977) % 1009) as f64 / 1009.0 - 0.5) * 0.25).collect();
            let wj: Vec<f64> =
                wi.iter().enumerate().map(|(k, v)| v + ((k as u64 * 7 + s) % 13) as f64 * 1e-7).collect();
            let xi: Vec<f32> = wi.iter().map(|&v| v as f32).collect();
            let xj: Vec<f32> = wj.iter().map(|&v| v as f32).collect();
            let dot: f32 = xi.iter().zip(&xj).map(|(a, b)| a * b).sum();
            let nj: f64 = xj.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            let key = ((1.0 - c) * nj) as f32 + -2.0 * dot;
            let ni: f64 = wi.iter().map(|v| v * v).sum();
            let lower = (1.0 - c) * ni + f64::from(key);
            let exact = exact_sq_dist(&wi, &wj);
            worst = worst.max(lower - exact);
        }
        assert!(worst <= 0.0, "lower bound exceeded the exact distance by {worst}");
    }
}
