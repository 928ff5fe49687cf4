//! TensorBoard event files: every numeric field of each `metrics.jsonl`
//! record as a scalar at the record's `env_steps`, in
//! `RUN/tb/events.out.tfevents.<unix seconds>.<host>`, so that `tensorboard
//! --logdir runs/` (or W&B's TensorBoard import) shows a run's curves.
//! Nested objects become `/`-separated tags (`phase_s/collect`), which
//! TensorBoard groups by their prefix; null fields are left out.
//!
//! The format is TensorFlow's record framing around protobuf `Event`
//! messages. The few fields needed are encoded here by hand: the Rust
//! TensorBoard writers on crates.io pull in an old protobuf runtime and an
//! image library for this, and are no longer maintained.
//!
//! The files are derived from `metrics.jsonl`. Every start of `ddppo train`
//! (a new run, `--resume`, a requeued command) rebuilds `tb/` from the
//! records kept there, which a resume has cut back to its checkpoint, and
//! appends from then on. The curves of a resumed run therefore never hold a
//! step twice or out of order, and always equal `metrics.jsonl`.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub const TB_DIR: &str = "tb";
/// What TensorFlow writes as the first event of every file.
const FILE_VERSION: &str = "brain.Event:2";
/// Every event file's name starts so; TensorBoard reads the files whose name
/// contains `tfevents`, which the temporary name does not.
const PREFIX: &str = "events.out.tfevents.";
const TMP_NAME: &str = ".events.tmp";

/// Appends one event per metrics record to the run's event file.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
    /// Unix time at which the run's `wall_s` clock read zero: an event's
    /// wall time is `origin + wall_s`, so the rebuilt events keep their
    /// spacing and the appended ones continue it.
    origin: f64,
}

impl EventWriter {
    /// Rebuilds `run/tb/` from the records of `run/metrics.jsonl` and opens
    /// the new event file for appending.
    pub fn open(run: &Path) -> Result<Self> {
        // A torn last line has no event: resuming cuts it from metrics.jsonl.
        let (records, _torn) = crate::run_dir::read_records(&run.join(crate::run_dir::METRICS_FILE))?;
        Self::rebuild(&run.join(TB_DIR), &records)
    }

    /// Writes `records` into a fresh event file under a temporary name,
    /// removes the old event files, then gives the new one its name: a
    /// crash at any point leaves no duplicate steps, and the next start
    /// rebuilds whatever is missing.
    pub fn rebuild(tb: &Path, records: &[Value]) -> Result<Self> {
        std::fs::create_dir_all(tb).with_context(|| format!("cannot create {}", tb.display()))?;
        let now = unix_now();
        let origin = now - records.last().and_then(wall_s).unwrap_or(0.0);
        let mut bytes = record(&file_version_event(now));
        for (i, r) in records.iter().enumerate() {
            let event = scalars_event(r, origin, now).with_context(|| format!("metrics record {}", i + 1))?;
            bytes.extend(record(&event));
        }
        let tmp = tb.join(TMP_NAME);
        let written = std::fs::File::create(&tmp).and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("cannot write {}", tmp.display()));
        }
        let entries = std::fs::read_dir(tb).with_context(|| format!("cannot list {}", tb.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(PREFIX)) {
                std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
        let path = tb.join(format!("{PREFIX}{}.{}", now as u64, host()));
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self { file, path, origin })
    }

    /// Appends the scalars of one metrics record (a `metrics.jsonl` object).
    pub fn write(&mut self, metrics: &Value) -> Result<()> {
        let event = scalars_event(metrics, self.origin, unix_now())?;
        let before = self.file.metadata().with_context(|| format!("cannot read {}", self.path.display()))?.len();
        // One write per record; a failed one (a full disk) is cut back, and a
        // process killed inside it leaves a torn record that the next start
        // rebuilds away.
        if let Err(e) = self.file.write_all(&record(&event)).and_then(|()| self.file.flush()) {
            let _ = self.file.set_len(before);
            return Err(e).with_context(|| format!("cannot write {}", self.path.display()));
        }
        Ok(())
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn wall_s(record: &Value) -> Option<f64> {
    record.get("wall_s").and_then(Value::as_f64)
}

/// TensorFlow names event files after the host that wrote them.
fn host() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String =
        name.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect();
    if name.is_empty() { "localhost".into() } else { name }
}

/// The `Event` of one metrics record: its numeric fields at its `env_steps`.
fn scalars_event(metrics: &Value, origin: f64, now: f64) -> Result<Vec<u8>> {
    let Some(step) = metrics.get("env_steps").and_then(Value::as_u64) else {
        bail!("no env_steps");
    };
    let step = i64::try_from(step).context("env_steps above 2^63")?;
    let mut scalars = Vec::new();
    flatten("", metrics, &mut scalars);
    let wall_time = wall_s(metrics).map_or(now, |w| origin + w);
    Ok(event(wall_time, step, &EventBody::Scalars(&scalars)))
}

/// The numeric leaves of a JSON value with `/`-joined paths; nulls,
/// strings, booleans and arrays are not scalars.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, f32)>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let tag = if prefix.is_empty() { k.clone() } else { format!("{prefix}/{k}") };
                flatten(&tag, v, out);
            }
        }
        // TensorBoard's scalar is a float32 (`simple_value`).
        Value::Number(n) => out.extend(n.as_f64().map(|x| (prefix.to_string(), x as f32))),
        _ => {}
    }
}

fn file_version_event(wall_time: f64) -> Vec<u8> {
    event(wall_time, 0, &EventBody::FileVersion(FILE_VERSION))
}

enum EventBody<'a> {
    FileVersion(&'a str),
    Scalars(&'a [(String, f32)]),
}

// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// `tensorflow.Event` (event.proto): wall_time = 1 (double), step = 2
/// (int64), file_version = 3 (string), summary = 5 (`Summary`, whose
/// repeated `Value` = 1 holds tag = 1 (string) and simple_value = 2
/// (float)). Fields in number order and a zero step left out, as
/// protobuf's own serialisers write them.
fn event(wall_time: f64, step: i64, body: &EventBody) -> Vec<u8> {
    let mut out = Vec::new();
    key(1, FIXED64, &mut out);
    out.extend(wall_time.to_le_bytes());
    if step != 0 {
        key(2, VARINT, &mut out);
        varint(step as u64, &mut out);
    }
    match body {
        EventBody::FileVersion(v) => bytes_field(3, v.as_bytes(), &mut out),
        EventBody::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, x) in values.iter() {
                let mut value = Vec::new();
                bytes_field(1, tag.as_bytes(), &mut value);
                key(2, FIXED32, &mut value);
                value.extend(x.to_le_bytes());
                bytes_field(1, &value, &mut summary);
            }
            bytes_field(5, &summary, &mut out);
        }
    }
    out
}

fn key(field: u32, wire: u8, out: &mut Vec<u8>) {
    varint(u64::from(field) << 3 | u64::from(wire), out);
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    key(field, LEN, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// TFRecord framing: length (u64 LE), masked CRC-32C of those 8 bytes, the
/// data, masked CRC-32C of the data.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend(len);
    out.extend(masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend(masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's masking of a CRC-32C (rotate right by 15, add a constant):
/// TensorFlow stores masked CRCs because the CRC of data that itself holds
/// CRCs is weak.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// The CRC-32C check value of the CRC catalogue and the iSCSI test
    /// vectors of RFC 3720, appendix B.4.
    #[test]
    fn crc32c_matches_published_check_values() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c::crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let up: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c::crc32c(&up), 0x46dd_794e);
        let down: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c::crc32c(&down), 0x113f_db5c);
    }

    /// Values of TensorBoard's `pywrap_tensorflow.masked_crc32c` (2.21.0).
    #[test]
    fn masked_crc_matches_tensorboard() {
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc(&29u64.to_le_bytes()), 0x23df_2f60);
    }

    /// The expected bytes are TensorBoard 2.21.0's: `event_pb2.Event(...)
    /// .SerializeToString()` framed by its `RecordWriter`.
    #[test]
    fn events_and_records_match_tensorboard_bytes() {
        let e = file_version_event(1_700_000_000.5);
        assert_eq!(e, hex("0900002040fc54d9411a0d627261696e2e4576656e743a32"));
        assert_eq!(record(&e), hex("1800000000000000a37f4b220900002040fc54d9411a0d627261696e2e4576656e743a322b353110"));

        let values = [("return_mean".to_string(), -1234.5f32), ("phase_s/collect".to_string(), 0.1f32)];
        let e = event(1_700_000_001.25, 150, &EventBody::Scalars(&values));
        assert_eq!(
            record(&e),
            hex(concat!(
                "3a000000000000001295eae20900005040fc54d9411096012a2c0a120a0b72657475726e5f6d65616e1500509ac4",
                "0a160a0f70686173655f732f636f6c6c65637415cdcccc3dc7ed7a4f"
            ))
        );
        // A step of several varint bytes.
        let e = event(1_700_000_002.0, 3_000_000_000, &EventBody::Scalars(&[("alpha".to_string(), 0.2)]));
        assert_eq!(
            record(&e),
            hex("1f00000000000000514b44180900008040fc54d9411080bcc1960b2a0e0a0c0a05616c70686115cdcc4c3e674c0b7d")
        );
        // Step 0 is left out; a zero value is written (it is in a oneof).
        let e = event(1_700_000_003.0, 0, &EventBody::Scalars(&[("x".to_string(), 0.0)]));
        assert_eq!(e, hex("090000c040fc54d9412a0a0a080a01781500000000"));
    }

    #[test]
    fn numeric_fields_flatten_to_slash_tags_and_nulls_are_left_out() {
        let v: Value = serde_json::from_str(
            r#"{"env_steps": 300, "return_mean": -1.5, "model_loss": null, "task": "x", "done": true,
                "phase_s": {"collect": 2.0, "model": {"train": 0.25}}}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        flatten("", &v, &mut out);
        out.sort_by(|a, b| a.0.cmp(&b.0));
        let want =
            [("env_steps", 300.0), ("phase_s/collect", 2.0), ("phase_s/model/train", 0.25), ("return_mean", -1.5)];
        assert_eq!(out, want.map(|(k, x)| (k.to_string(), x)));
    }

    /// Splits an event file into its records, checking the framing.
    fn records_of(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(masked_crc(&bytes[at..at + 8]).to_le_bytes(), bytes[at + 8..at + 12]);
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(masked_crc(data).to_le_bytes(), bytes[at + 12 + len..at + 16 + len]);
            out.push(data.to_vec());
            at += 16 + len;
        }
        out
    }

    fn event_files(tb: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(tb).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort();
        v
    }

    /// A rebuild replaces every older event file by one that holds exactly
    /// the given records, and appends after them.
    #[test]
    fn rebuild_replaces_the_old_event_files() {
        let tb = std::env::temp_dir().join(format!("ddppo-tb-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tb);
        std::fs::create_dir_all(&tb).unwrap();
        std::fs::write(tb.join("events.out.tfevents.1.old"), b"stale").unwrap();
        std::fs::write(tb.join("events.out.tfevents.2.old"), b"stale").unwrap();
        std::fs::write(tb.join("notes.txt"), b"not ours").unwrap();
        let recs: Vec<Value> = (0..3).map(|i| serde_json::json!({"env_steps": i * 150, "wall_s": i as f64})).collect();
        let mut w = EventWriter::rebuild(&tb, &recs[..2]).unwrap();
        w.write(&recs[2]).unwrap();
        drop(w);
        let files = event_files(&tb);
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(files[1].ends_with("notes.txt"));
        let name = files[0].file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(PREFIX) && !name.ends_with(".old"), "{name}");
        let recs_read = records_of(&std::fs::read(&files[0]).unwrap());
        assert_eq!(recs_read.len(), 4, "file_version + 3 records");
        assert!(recs_read[0].ends_with(FILE_VERSION.as_bytes()));
        // Steps 150 and 300 (step 0 is not written): varint 0x96 0x01 and 0xac 0x02.
        assert_eq!(recs_read[1][9], 0x2a, "step 0 left out: wall_time, then the summary");
        assert_eq!(recs_read[2][9..12], [0x10, 0x96, 0x01]);
        assert_eq!(recs_read[3][9..12], [0x10, 0xac, 0x02]);
        // Wall times keep the records' spacing (wall_s 0, 1, 2 s).
        let wall = |r: &Vec<u8>| f64::from_le_bytes(r[1..9].try_into().unwrap());
        assert!((wall(&recs_read[2]) - wall(&recs_read[1]) - 1.0).abs() < 1e-6);
        assert!((wall(&recs_read[3]) - wall(&recs_read[2]) - 1.0).abs() < 1e-6);
        let _ = std::fs::remove_dir_all(&tb);
    }
}
