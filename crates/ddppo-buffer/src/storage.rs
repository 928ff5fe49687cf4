//! Saving and loading a [`ReplayBuffer`] (checkpoints and resume).
//!
//! File layout, all integers and floats little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"DDPPORB\0"` |
//! | 8 | 4 | format version `u32` (= 1) |
//! | 12 | 4 | `obs_dim` `u32` |
//! | 16 | 4 | `act_dim` `u32` |
//! | 20 | 4 | reserved `u32` (= 0) |
//! | 24 | 8 | `capacity` `u64` |
//! | 32 | 8 | `len` (rows stored) `u64` |
//! | 40 | 8 | write position `u64` (physical row of the next push) |
//! | 48 | ... | payload: the columns `obs` (len x obs_dim), `act` (len x act_dim), `rew` (len), `next_obs` (len x obs_dim), `mask` (len), `done` (len), each `f32`, rows in physical (ring) order |
//! | end - 8 | 8 | FNV-1a 64-bit hash of every byte before it |
//!
//! The file is written to `<path>.tmp`, flushed and fsync'ed, then renamed
//! over `path`, so a crash mid-write leaves any old file intact.
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::replay::ReplayBuffer;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"DDPPORB\0";
/// The layout version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 48;

/// FNV-1a, 64-bit (offset basis and prime from the FNV specification); also
/// the checksum of the agent's checkpoint manifests.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv1a {
    /// The hash of no bytes (the offset basis).
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    /// The hash so far.
    pub fn value(&self) -> u64 {
        self.0
    }
    /// Hashes `bytes` after everything before.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// A writer that hashes everything it passes on.
struct Hashing<W> {
    inner: W,
    hash: Fnv1a,
}

impl<W: Write> Hashing<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hash.update(bytes);
        self.inner.write_all(bytes)
    }
    fn put_f32s(&mut self, values: &[f32]) -> std::io::Result<()> {
        let mut chunk = [0u8; 4096];
        for part in values.chunks(chunk.len() / 4) {
            for (dst, v) in chunk.chunks_exact_mut(4).zip(part) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
            self.put(&chunk[..part.len() * 4])?;
        }
        Ok(())
    }
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io { path: path.to_path_buf(), source }
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

impl ReplayBuffer {
    /// Writes the buffer to `path` (layout in the [module docs](crate::storage)):
    /// temp file, fsync, rename.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = temp_path(path);
        let write = || -> std::io::Result<()> {
            let file = File::create(&tmp)?;
            let mut w = Hashing { inner: BufWriter::with_capacity(1 << 20, file), hash: Fnv1a::new() };
            w.put(MAGIC)?;
            w.put(&FORMAT_VERSION.to_le_bytes())?;
            w.put(&(self.obs_dim as u32).to_le_bytes())?;
            w.put(&(self.act_dim as u32).to_le_bytes())?;
            w.put(&0u32.to_le_bytes())?;
            w.put(&(self.capacity as u64).to_le_bytes())?;
            w.put(&(self.len() as u64).to_le_bytes())?;
            w.put(&(self.pos as u64).to_le_bytes())?;
            for column in [&self.obs, &self.act, &self.rew, &self.next_obs, &self.mask, &self.done] {
                w.put_f32s(column)?;
            }
            let checksum = w.hash.0;
            w.inner.write_all(&checksum.to_le_bytes())?;
            let file = w.inner.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()
        };
        if self.obs_dim > u32::MAX as usize || self.act_dim > u32::MAX as usize {
            return Err(Error::Corrupt { path: path.to_path_buf(), reason: "dimensions exceed u32".into() });
        }
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_error(&tmp, e));
        }
        fs::rename(&tmp, path).map_err(|e| io_error(path, e))?;
        // Make the rename itself durable; not every platform can open a directory.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Reads a buffer written by [`save`](Self::save). A wrong magic, an
    /// unknown version, a truncated or over-long file, a checksum mismatch or
    /// inconsistent header fields are errors.
    pub fn load(path: &Path) -> Result<Self> {
        let corrupt = |reason: String| Error::Corrupt { path: path.to_path_buf(), reason };
        let mut bytes = Vec::new();
        File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(|e| io_error(path, e))?;
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(Error::NotABuffer { path: path.to_path_buf() });
        }
        if bytes.len() < HEADER_LEN + 8 {
            return Err(corrupt(format!("truncated: {} bytes, shorter than the header", bytes.len())));
        }
        let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let obs_dim = u32_at(12) as usize;
        let act_dim = u32_at(16) as usize;
        let (capacity, len, pos) = (u64_at(24), u64_at(32), u64_at(40));
        if len > capacity {
            return Err(corrupt(format!("header says {len} rows in a capacity of {capacity}")));
        }
        let pos_ok = if len < capacity { pos == len } else { pos < capacity || capacity == 0 };
        if !pos_ok {
            return Err(corrupt(format!("write position {pos} impossible with {len} rows, capacity {capacity}")));
        }
        // Floats per row; computed in u128 so a forged header cannot overflow.
        let per_row = 2 * obs_dim as u128 + act_dim as u128 + 3;
        let expected = HEADER_LEN as u128 + 4 * per_row * len as u128 + 8;
        if bytes.len() as u128 != expected {
            return Err(corrupt(format!(
                "{} bytes on disk, the header implies {expected} (truncated or trailing data)",
                bytes.len()
            )));
        }
        let body = bytes.len() - 8;
        let mut hash = Fnv1a::new();
        hash.update(&bytes[..body]);
        if hash.0 != u64_at(body) {
            return Err(corrupt("checksum mismatch".into()));
        }
        let (len, capacity, pos) = (len as usize, capacity as usize, pos as usize);
        let mut offset = HEADER_LEN;
        let mut column = |count: usize| -> Vec<f32> {
            let out = bytes[offset..offset + 4 * count]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            offset += 4 * count;
            out
        };
        let buffer = ReplayBuffer {
            obs_dim,
            act_dim,
            capacity,
            pos,
            obs: column(len * obs_dim),
            act: column(len * act_dim),
            rew: column(len),
            next_obs: column(len * obs_dim),
            mask: column(len),
            done: column(len),
        };
        let finite = [&buffer.obs, &buffer.act, &buffer.rew, &buffer.next_obs, &buffer.mask, &buffer.done]
            .iter()
            .all(|c| c.iter().all(|v| v.is_finite()));
        if !finite {
            return Err(corrupt("non-finite value in the payload".into()));
        }
        Ok(buffer)
    }
}
