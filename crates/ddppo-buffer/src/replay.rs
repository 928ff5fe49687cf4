//! Fixed-capacity replay buffers `D_env` and `D_model` (ALGORITHM.md
//! section 1, steps 2 and 3; section 5 for the mixed critic batch).
use rand::Rng;

use crate::{Error, Result};

/// A ring of transitions `(s, a, r, s', mask, done)` stored as contiguous
/// `f32` columns (struct of arrays). When full, a push overwrites the oldest
/// row. Storage grows with the rows pushed, up to the capacity, so a large
/// `D_model` capacity costs no memory until it is used.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayBuffer {
    pub(crate) obs_dim: usize,
    pub(crate) act_dim: usize,
    pub(crate) capacity: usize,
    /// Physical row the next push writes (equals `len` until the ring is full).
    pub(crate) pos: usize,
    pub(crate) obs: Vec<f32>,
    pub(crate) act: Vec<f32>,
    pub(crate) rew: Vec<f32>,
    pub(crate) next_obs: Vec<f32>,
    pub(crate) mask: Vec<f32>,
    pub(crate) done: Vec<f32>,
}

/// A caller-owned batch of rows, refilled in place by the samplers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// Rows per sample.
    pub size: usize,
    /// `size x obs_dim`, row-major.
    pub obs: Vec<f32>,
    /// `size x act_dim`, row-major.
    pub act: Vec<f32>,
    /// `size`.
    pub rew: Vec<f32>,
    /// `size x obs_dim`, row-major.
    pub next_obs: Vec<f32>,
    /// `size`; 0 only on a true terminal.
    pub mask: Vec<f32>,
    /// `size`.
    pub done: Vec<f32>,
}

impl Batch {
    /// A batch of `size` rows with its columns allocated once.
    pub fn new(size: usize, obs_dim: usize, act_dim: usize) -> Self {
        let mut b = Self { size, ..Self::default() };
        b.shape(obs_dim, act_dim);
        b
    }

    /// Sizes the columns for `self.size` rows; allocates only when they grew.
    fn shape(&mut self, obs_dim: usize, act_dim: usize) {
        self.obs.resize(self.size * obs_dim, 0.0);
        self.act.resize(self.size * act_dim, 0.0);
        self.rew.resize(self.size, 0.0);
        self.next_obs.resize(self.size * obs_dim, 0.0);
        self.mask.resize(self.size, 0.0);
        self.done.resize(self.size, 0.0);
    }
}

/// Contiguous columns of consecutive rows, oldest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Columns {
    /// `rows x obs_dim`.
    pub obs: Vec<f32>,
    /// `rows x act_dim`.
    pub act: Vec<f32>,
    /// `rows`.
    pub rew: Vec<f32>,
    /// `rows x obs_dim`.
    pub next_obs: Vec<f32>,
    /// `rows`.
    pub mask: Vec<f32>,
    /// `rows`.
    pub done: Vec<f32>,
}

impl Columns {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rew.len()
    }

    /// No rows.
    pub fn is_empty(&self) -> bool {
        self.rew.is_empty()
    }
}

impl ReplayBuffer {
    /// An empty buffer for `capacity` rows of `obs_dim` observations and
    /// `act_dim` actions. Nothing is allocated until rows are pushed.
    pub fn new(obs_dim: usize, act_dim: usize, capacity: usize) -> Self {
        Self {
            obs_dim,
            act_dim,
            capacity,
            pos: 0,
            obs: Vec::new(),
            act: Vec::new(),
            rew: Vec::new(),
            next_obs: Vec::new(),
            mask: Vec::new(),
            done: Vec::new(),
        }
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.rew.len()
    }

    /// No rows held.
    pub fn is_empty(&self) -> bool {
        self.rew.is_empty()
    }

    /// Most rows held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Observation width.
    pub fn obs_dim(&self) -> usize {
        self.obs_dim
    }

    /// Action width.
    pub fn act_dim(&self) -> usize {
        self.act_dim
    }

    /// Appends one transition, overwriting the oldest when full. A row of the
    /// wrong width or with a non-finite value is an error and pushes nothing.
    pub fn push(&mut self, s: &[f32], a: &[f32], r: f32, s_next: &[f32], mask: f32, done: f32) -> Result<()> {
        self.push_batch(s, a, &[r], s_next, &[mask], &[done])
    }

    /// Appends `rew.len()` transitions given as row-major columns, oldest
    /// first. All rows are checked before any is written: on error nothing is
    /// pushed. More rows than the capacity keep only the newest.
    pub fn push_batch(
        &mut self,
        obs: &[f32],
        act: &[f32],
        rew: &[f32],
        next_obs: &[f32],
        mask: &[f32],
        done: &[f32],
    ) -> Result<()> {
        let rows = rew.len();
        let check_len = |column: &'static str, got: usize, width: usize| {
            if got == rows * width {
                Ok(())
            } else {
                Err(Error::RowWidth { column, expected: rows * width, got, rows })
            }
        };
        check_len("obs", obs.len(), self.obs_dim)?;
        check_len("act", act.len(), self.act_dim)?;
        check_len("next_obs", next_obs.len(), self.obs_dim)?;
        check_len("mask", mask.len(), 1)?;
        check_len("done", done.len(), 1)?;
        for (column, values, width) in [
            ("obs", obs, self.obs_dim),
            ("act", act, self.act_dim),
            ("rew", rew, 1),
            ("next_obs", next_obs, self.obs_dim),
            ("mask", mask, 1),
            ("done", done, 1),
        ] {
            if let Some(k) = values.iter().position(|v| !v.is_finite()) {
                let row = k.checked_div(width).unwrap_or(0);
                return Err(Error::NonFiniteValue { column, row, value: values[k] });
            }
        }
        if rows == 0 {
            return Ok(());
        }
        if self.capacity == 0 {
            return Err(Error::ZeroCapacity);
        }
        // Rows that would be overwritten within this same call are skipped.
        let skip = rows.saturating_sub(self.capacity);
        for i in skip..rows {
            self.write_row(
                &obs[i * self.obs_dim..(i + 1) * self.obs_dim],
                &act[i * self.act_dim..(i + 1) * self.act_dim],
                rew[i],
                &next_obs[i * self.obs_dim..(i + 1) * self.obs_dim],
                mask[i],
                done[i],
            );
        }
        Ok(())
    }

    fn write_row(&mut self, s: &[f32], a: &[f32], r: f32, s_next: &[f32], mask: f32, done: f32) {
        if self.len() < self.capacity {
            self.obs.extend_from_slice(s);
            self.act.extend_from_slice(a);
            self.rew.push(r);
            self.next_obs.extend_from_slice(s_next);
            self.mask.push(mask);
            self.done.push(done);
        } else {
            let p = self.pos;
            let (od, ad) = (self.obs_dim, self.act_dim);
            self.obs[p * od..(p + 1) * od].copy_from_slice(s);
            self.act[p * ad..(p + 1) * ad].copy_from_slice(a);
            self.rew[p] = r;
            self.next_obs[p * od..(p + 1) * od].copy_from_slice(s_next);
            self.mask[p] = mask;
            self.done[p] = done;
        }
        self.pos = (self.pos + 1) % self.capacity;
    }

    /// Physical row of the `k`-th oldest row.
    fn physical(&self, k: usize) -> usize {
        if self.len() < self.capacity { k } else { (self.pos + k) % self.capacity }
    }

    fn copy_row_into(&self, row: usize, batch: &mut Batch, dst: usize) {
        let (od, ad) = (self.obs_dim, self.act_dim);
        batch.obs[dst * od..(dst + 1) * od].copy_from_slice(&self.obs[row * od..(row + 1) * od]);
        batch.act[dst * ad..(dst + 1) * ad].copy_from_slice(&self.act[row * ad..(row + 1) * ad]);
        batch.rew[dst] = self.rew[row];
        batch.next_obs[dst * od..(dst + 1) * od].copy_from_slice(&self.next_obs[row * od..(row + 1) * od]);
        batch.mask[dst] = self.mask[row];
        batch.done[dst] = self.done[row];
    }

    /// Fills `batch` with `batch.size` rows drawn uniformly with replacement.
    /// The batch's columns are resized only if their shape changed.
    ///
    /// Panics if the buffer is empty (see [`try_sample_into`](Self::try_sample_into)).
    pub fn sample_into(&self, rng: &mut impl Rng, batch: &mut Batch) {
        if let Err(e) = self.try_sample_into(rng, batch) {
            panic!("{e}");
        }
    }

    /// [`sample_into`](Self::sample_into), with an error for an empty buffer.
    pub fn try_sample_into(&self, rng: &mut impl Rng, batch: &mut Batch) -> Result<()> {
        batch.shape(self.obs_dim, self.act_dim);
        self.sample_range(rng, batch, 0, batch.size)
    }

    /// Rows `from..to` of `batch` drawn uniformly from this buffer.
    fn sample_range(&self, rng: &mut impl Rng, batch: &mut Batch, from: usize, to: usize) -> Result<()> {
        if from == to {
            return Ok(());
        }
        if self.is_empty() {
            return Err(Error::EmptyBuffer);
        }
        let len = self.len();
        for dst in from..to {
            // Physical order is irrelevant for uniform sampling.
            let row = rng.random_range(0..len);
            self.copy_row_into(row, batch, dst);
        }
        Ok(())
    }

    /// The newest `n` rows (all rows if fewer), oldest first, as contiguous columns.
    pub fn newest(&self, n: usize) -> Columns {
        let n = n.min(self.len());
        let start = self.len() - n;
        let (od, ad) = (self.obs_dim, self.act_dim);
        let mut c = Columns {
            obs: Vec::with_capacity(n * od),
            act: Vec::with_capacity(n * ad),
            rew: Vec::with_capacity(n),
            next_obs: Vec::with_capacity(n * od),
            mask: Vec::with_capacity(n),
            done: Vec::with_capacity(n),
        };
        // At most two contiguous physical runs: copy each as slices.
        for (lo, hi) in self.physical_runs(start, self.len()) {
            c.obs.extend_from_slice(&self.obs[lo * od..hi * od]);
            c.act.extend_from_slice(&self.act[lo * ad..hi * ad]);
            c.rew.extend_from_slice(&self.rew[lo..hi]);
            c.next_obs.extend_from_slice(&self.next_obs[lo * od..hi * od]);
            c.mask.extend_from_slice(&self.mask[lo..hi]);
            c.done.extend_from_slice(&self.done[lo..hi]);
        }
        c
    }

    /// Physical row ranges covering logical rows `from..to` (oldest = 0), in order.
    fn physical_runs(&self, from: usize, to: usize) -> Vec<(usize, usize)> {
        if from >= to {
            return Vec::new();
        }
        let (a, b) = (self.physical(from), self.physical(to - 1) + 1);
        if a < b { vec![(a, b)] } else { vec![(a, self.len()), (0, b)] }
    }

    /// Changes the capacity, keeping the newest `min(len, capacity)` rows
    /// (`D_model` is resized before every model rollout, ALGORITHM.md
    /// section 1 step 3).
    pub fn resize(&mut self, capacity: usize) {
        let keep = self.newest(capacity);
        self.capacity = capacity;
        self.pos = if capacity == 0 { 0 } else { keep.len() % capacity };
        self.obs = keep.obs;
        self.act = keep.act;
        self.rew = keep.rew;
        self.next_obs = keep.next_obs;
        self.mask = keep.mask;
        self.done = keep.done;
    }
}

/// Fills `batch` with `round(real_ratio * batch.size)` rows from `env`
/// (`D_env`) followed by the rest from `model` (`D_model`), each uniform with
/// replacement (ALGORITHM.md section 5: `real_ratio = 0.05`). When one buffer
/// is empty every row comes from the other.
///
/// Panics if both buffers are empty or their widths differ (see
/// [`try_sample_mixed`]).
pub fn sample_mixed(env: &ReplayBuffer, model: &ReplayBuffer, real_ratio: f64, rng: &mut impl Rng, batch: &mut Batch) {
    if let Err(e) = try_sample_mixed(env, model, real_ratio, rng, batch) {
        panic!("{e}");
    }
}

/// [`sample_mixed`] with errors instead of panics: both buffers empty,
/// different widths, or `real_ratio` outside `[0, 1]`.
pub fn try_sample_mixed(
    env: &ReplayBuffer,
    model: &ReplayBuffer,
    real_ratio: f64,
    rng: &mut impl Rng,
    batch: &mut Batch,
) -> Result<()> {
    if !(0.0..=1.0).contains(&real_ratio) {
        return Err(Error::RealRatio(real_ratio));
    }
    if (env.obs_dim, env.act_dim) != (model.obs_dim, model.act_dim) {
        return Err(Error::MixedWidths { env: (env.obs_dim, env.act_dim), model: (model.obs_dim, model.act_dim) });
    }
    batch.shape(env.obs_dim, env.act_dim);
    let size = batch.size;
    let real = match (env.is_empty(), model.is_empty()) {
        (true, true) => return Err(Error::EmptyBuffer),
        (false, true) => size,
        (true, false) => 0,
        (false, false) => ((real_ratio * size as f64).round() as usize).min(size),
    };
    env.sample_range(rng, batch, 0, real)?;
    model.sample_range(rng, batch, real, size)
}
