//! The files of a run directory, as `ddppo train` writes them:
//!
//! - `config.toml`: the resolved config; its top-level `task`, `variant` and
//!   `seed` keys identify the run;
//! - `metrics.jsonl`: one JSON object per evaluation (see [`Metrics`]);
//! - `metrics.csv`: the same records as CSV;
//! - `checkpoints/`: the newest complete checkpoint and the one before it.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::Path;

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";

/// The fields of a `metrics.jsonl` line (an `ddppo_agent::EvalRecord`) that
/// plots and tables read.
#[derive(Debug, Clone, Deserialize)]
pub struct Metrics {
    pub env_steps: u64,
    pub return_mean: f64,
}

/// What identifies a run among others in a plot or an ablation table.
#[derive(Debug, Clone, PartialEq)]
pub struct RunIdentity {
    pub env: String,
    pub variant: String,
    pub seed: u64,
}

pub fn identity(dir: &Path) -> Result<RunIdentity> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} is not a run directory (no readable {CONFIG_FILE})", dir.display()))?;
    let value: toml::Table = toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let string = |key: &str| -> Result<String> {
        value
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .with_context(|| format!("{} has no string key `{key}`", path.display()))
    };
    let seed = value
        .get("seed")
        .and_then(|v| v.as_integer())
        .and_then(|s| u64::try_from(s).ok())
        .with_context(|| format!("{} has no non-negative integer key `seed`", path.display()))?;
    Ok(RunIdentity { env: string("task")?, variant: string("variant")?, seed })
}

/// The records of a `metrics.jsonl` (one JSON object per line). A last line
/// without its newline was torn by a crash or a full disk while it was
/// appended: it is left out and reported as the second value (its 1-based
/// line number). A bad complete line is an error.
pub fn read_records(path: &Path) -> Result<(Vec<serde_json::Value>, Option<usize>)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            // Torn inside a multi-byte character: read it lossily, the torn
            // line then fails to parse below.
            String::from_utf8_lossy(&std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?)
                .into_owned()
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<serde_json::Value>(line).ok().filter(|v| v.is_object());
        match parsed {
            Some(v) if line.ends_with('\n') => out.push(v),
            // Appends end in a newline, written in one call: a line without
            // one was cut short; a complete line that does not parse is damage.
            _ if last && !line.ends_with('\n') => return Ok((out, Some(i + 1))),
            _ => bail!("{}:{}: not a metrics record", path.display(), i + 1),
        }
    }
    Ok((out, None))
}

/// The JSON records of the run in `dir` for plots and tables (its
/// `metrics.jsonl` must exist); a torn last line is skipped with a warning.
pub fn read_run_records(dir: &Path) -> Result<Vec<serde_json::Value>> {
    let path = dir.join(METRICS_FILE);
    if !path.is_file() {
        bail!("cannot read {}: no such file", path.display());
    }
    let (records, torn) = read_records(&path)?;
    if let Some(line) = torn {
        note!("warning: {}:{line}: skipping a torn last line", path.display());
    }
    Ok(records)
}

/// The records of a run for plots and tables; a torn last line is skipped
/// with a warning.
pub fn read_metrics(dir: &Path) -> Result<Vec<Metrics>> {
    let path = dir.join(METRICS_FILE);
    let records = read_run_records(dir)?;
    let mut out = Vec::new();
    for (i, v) in records.into_iter().enumerate() {
        let m: Metrics =
            serde_json::from_value(v).with_context(|| format!("{}:{}: not a metrics record", path.display(), i + 1))?;
        if !m.return_mean.is_finite() {
            bail!("{}:{}: return_mean is not finite", path.display(), i + 1);
        }
        out.push(m);
    }
    Ok(out)
}

/// Appends `line` and a newline to `file` in one write; if the write fails
/// (a full disk), the file is cut back to its old length, so no torn line is
/// left behind.
pub fn append_line(file: &mut std::fs::File, path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let before = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line.as_bytes());
    bytes.push(b'\n');
    if let Err(e) = file.write_all(&bytes).and_then(|_| file.flush()) {
        let _ = file.set_len(before);
        return Err(e).with_context(|| format!("cannot append to {}", path.display()));
    }
    Ok(())
}

/// Writes `bytes` to a temporary name beside `path`, syncs it, and renames it
/// over `path`: a crash leaves either the old file or the new one, and a
/// failed write (a full disk) removes the temporary file again.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// A CSV header and row from a JSON object: nested objects flatten to
/// `outer.inner` columns; `env_steps` and the returns come first.
pub fn csv_row(value: &serde_json::Value) -> (String, String) {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    flatten(&key, v, out);
                }
            }
            serde_json::Value::Null => out.push((prefix.to_string(), String::new())),
            serde_json::Value::String(s) => out.push((prefix.to_string(), s.clone())),
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut cols = Vec::new();
    flatten("", value, &mut cols);
    const FIRST: [&str; 4] = ["env_steps", "return_mean", "return_std", "wall_s"];
    cols.sort_by_key(|(k, _)| (FIRST.iter().position(|f| f == k).unwrap_or(FIRST.len()), k.clone()));
    let header = cols.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(",");
    let row = cols.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>().join(",");
    (header, row)
}

/// The lock file of a run directory.
pub const LOCK_FILE: &str = "lock";

/// An exclusive lock on a run directory, held for the life of the process:
/// an OS file lock (`flock`) on `DIR/lock`, which the kernel releases on any
/// death, so a killed run never leaves a stale lock. The file names the
/// holder (host and pid) for the message another process prints.
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Takes the lock of `dir`, waiting up to `wait` for another holder to
    /// let go (a requeued cluster job may start while its predecessor still
    /// writes its last checkpoint); `stop` ends the wait early (a signal).
    pub fn acquire(dir: &Path, wait: std::time::Duration, stop: &dyn Fn() -> bool) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        let started = std::time::Instant::now();
        let mut said = false;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => {
                    bail!(
                        "cannot lock {} ({e}): its file system does not support locks; use a local directory",
                        path.display()
                    )
                }
            }
            let mut holder = String::new();
            let _ = file.rewind().and_then(|_| file.read_to_string(&mut holder));
            let holder = holder.trim();
            let holder = if holder.is_empty() { "another process" } else { holder };
            if started.elapsed() >= wait || stop() {
                bail!(
                    "{} is in use by {holder} (lock file {}); waited {} s",
                    dir.display(),
                    path.display(),
                    wait.as_secs()
                );
            }
            if !said {
                note!("waiting up to {} s for {} (in use by {holder})", wait.as_secs(), dir.display());
                said = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let me = format!("{} pid {}\n", hostname(), std::process::id());
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| file.write_all(me.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self { _file: file })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}
