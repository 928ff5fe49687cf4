//! ReplayBuffer against a plain Vec-of-rows model, sampling, mixing, save/load.

use std::path::PathBuf;

use ddppo_buffer::{Batch, Error, ReplayBuffer, sample_mixed, try_sample_mixed};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const OBS: usize = 3;
const ACT: usize = 2;

/// One transition: (s, a, r, s', mask, done).
type Row = (Vec<f32>, Vec<f32>, f32, Vec<f32>, f32, f32);

/// Row `k` has values derived from `k`, so any copied row identifies itself.
fn row(k: usize) -> Row {
    let k = k as f32;
    (
        (0..OBS).map(|j| k + j as f32 * 0.1).collect(),
        (0..ACT).map(|j| -k - j as f32 * 0.1).collect(),
        k * 10.0,
        (0..OBS).map(|j| k + 1.0 + j as f32 * 0.1).collect(),
        if (k as usize).is_multiple_of(7) { 0.0 } else { 1.0 },
        if (k as usize).is_multiple_of(5) { 1.0 } else { 0.0 },
    )
}

fn push_row(buf: &mut ReplayBuffer, k: usize) {
    let (s, a, r, s2, m, d) = row(k);
    buf.push(&s, &a, r, &s2, m, d).unwrap();
}

/// Checks that the columns hold exactly rows `ids` in that order.
fn assert_rows(c: &ddppo_buffer::Columns, ids: &[usize]) {
    assert_eq!(c.len(), ids.len());
    for (i, &k) in ids.iter().enumerate() {
        let (s, a, r, s2, m, d) = row(k);
        assert_eq!(&c.obs[i * OBS..(i + 1) * OBS], &s[..]);
        assert_eq!(&c.act[i * ACT..(i + 1) * ACT], &a[..]);
        assert_eq!(c.rew[i], r);
        assert_eq!(&c.next_obs[i * OBS..(i + 1) * OBS], &s2[..]);
        assert_eq!((c.mask[i], c.done[i]), (m, d));
    }
}

/// Each batch row must be one whole stored row (columns not mixed up).
fn batch_row_ids(b: &Batch) -> Vec<usize> {
    (0..b.size)
        .map(|i| {
            let k = (b.rew[i] / 10.0).round() as usize;
            let (s, a, _, s2, m, d) = row(k);
            assert_eq!(&b.obs[i * OBS..(i + 1) * OBS], &s[..]);
            assert_eq!(&b.act[i * ACT..(i + 1) * ACT], &a[..]);
            assert_eq!(&b.next_obs[i * OBS..(i + 1) * OBS], &s2[..]);
            assert_eq!((b.mask[i], b.done[i]), (m, d));
            k
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Op {
    Push,
    PushBatch(usize),
    Resize(usize),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => Just(Op::Push),
        2 => (0usize..25).prop_map(Op::PushBatch),
        1 => (1usize..30).prop_map(Op::Resize),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The ring always holds the newest `capacity` rows, oldest first.
    #[test]
    fn ring_matches_a_vec_model(capacity in 1usize..20, ops in prop::collection::vec(op_strategy(), 1..80)) {
        let mut buf = ReplayBuffer::new(OBS, ACT, capacity);
        let mut model: Vec<usize> = Vec::new();
        let mut cap = capacity;
        let mut next = 0usize;
        for op in ops {
            match op {
                Op::Push => { push_row(&mut buf, next); model.push(next); next += 1; }
                Op::PushBatch(rows) => {
                    let ids: Vec<usize> = (next..next + rows).collect();
                    let rs: Vec<_> = ids.iter().map(|&k| row(k)).collect();
                    let cat = |f: &dyn Fn(&Row) -> Vec<f32>| -> Vec<f32> {
                        rs.iter().flat_map(f).collect()
                    };
                    buf.push_batch(&cat(&|r| r.0.clone()), &cat(&|r| r.1.clone()), &cat(&|r| vec![r.2]),
                        &cat(&|r| r.3.clone()), &cat(&|r| vec![r.4]), &cat(&|r| vec![r.5])).unwrap();
                    model.extend(ids);
                    next += rows;
                }
                Op::Resize(c) => { buf.resize(c); cap = c; }
            }
            if model.len() > cap { model.drain(..model.len() - cap); }
            prop_assert_eq!(buf.len(), model.len());
            prop_assert_eq!(buf.capacity(), cap);
            assert_rows(&buf.newest(usize::MAX), &model);
            let k = model.len() / 2;
            assert_rows(&buf.newest(k), &model[model.len() - k..]);
        }
    }
}

#[test]
fn bad_rows_are_rejected_and_push_nothing() {
    let mut buf = ReplayBuffer::new(OBS, ACT, 10);
    push_row(&mut buf, 1);
    let before = buf.clone();
    let (s, a, r, s2, m, d) = row(2);
    let err = buf.push(&s[..2], &a, r, &s2, m, d).unwrap_err();
    assert!(matches!(err, Error::RowWidth { column: "obs", expected: 3, got: 2, rows: 1 }), "{err}");
    assert!(matches!(buf.push(&s, &a, r, &s2[..1], m, d), Err(Error::RowWidth { column: "next_obs", .. })));
    assert!(matches!(buf.push(&s, &[0.0; 3], r, &s2, m, d), Err(Error::RowWidth { column: "act", .. })));
    let mut bad = s2.clone();
    bad[1] = f32::NAN;
    let err = buf.push(&s, &a, r, &bad, m, d).unwrap_err();
    assert_eq!(err.to_string(), "column next_obs, row 0: non-finite value NaN");
    assert!(matches!(buf.push(&s, &a, f32::INFINITY, &s2, m, d), Err(Error::NonFiniteValue { column: "rew", .. })));
    // A batch with one bad row in the middle writes none of its rows.
    let obs: Vec<f32> = (0..3).flat_map(|k| row(k).0).collect();
    let mut act: Vec<f32> = (0..3).flat_map(|k| row(k).1).collect();
    act[ACT + 1] = f32::NEG_INFINITY;
    let err = buf.push_batch(&obs, &act, &[0.0; 3], &obs, &[1.0; 3], &[0.0; 3]).unwrap_err();
    assert!(matches!(err, Error::NonFiniteValue { column: "act", row: 1, .. }));
    assert_eq!(buf, before);
    assert!(matches!(ReplayBuffer::new(OBS, ACT, 0).push(&s, &a, r, &s2, m, d), Err(Error::ZeroCapacity)));
}

#[test]
fn sampling_is_seeded_uniform_and_reuses_the_batch() {
    let mut buf = ReplayBuffer::new(OBS, ACT, 10);
    for k in 0..25 {
        push_row(&mut buf, k); // keeps rows 15..25
    }
    let mut batch = Batch::new(256, OBS, ACT);
    let ptr = batch.obs.as_ptr();
    let mut counts = [0usize; 10];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..200 {
        buf.sample_into(&mut rng, &mut batch);
        for k in batch_row_ids(&batch) {
            assert!((15..25).contains(&k));
            counts[k - 15] += 1;
        }
    }
    assert_eq!(batch.obs.as_ptr(), ptr, "the batch columns were reallocated");
    // 51,200 draws over 10 rows: each count within 5 standard deviations.
    let expected = 5120.0;
    let sd = (51200.0f64 * 0.1 * 0.9).sqrt();
    for c in counts {
        assert!((c as f64 - expected).abs() < 5.0 * sd, "{counts:?}");
    }
    let mut b1 = Batch::new(64, OBS, ACT);
    let mut b2 = Batch::new(64, OBS, ACT);
    buf.sample_into(&mut ChaCha8Rng::seed_from_u64(3), &mut b1);
    buf.sample_into(&mut ChaCha8Rng::seed_from_u64(3), &mut b2);
    assert_eq!(b1, b2);
    // A default batch gets its columns shaped on first use.
    let mut b3 = Batch { size: 5, ..Batch::default() };
    buf.sample_into(&mut rng, &mut b3);
    assert_eq!((b3.obs.len(), b3.act.len(), b3.done.len()), (15, 10, 5));
    assert!(matches!(ReplayBuffer::new(OBS, ACT, 4).try_sample_into(&mut rng, &mut b3), Err(Error::EmptyBuffer)));
}

#[test]
fn mixed_batches_take_round_real_ratio_rows_from_env() {
    let mut env = ReplayBuffer::new(OBS, ACT, 100);
    let mut model = ReplayBuffer::new(OBS, ACT, 100);
    for k in 0..50 {
        push_row(&mut env, k);
    }
    for k in 1000..1050 {
        push_row(&mut model, k);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut batch = Batch::new(256, OBS, ACT);
    for (ratio, want) in [(0.05, 13usize), (0.0, 0), (1.0, 256), (0.5, 128)] {
        sample_mixed(&env, &model, ratio, &mut rng, &mut batch);
        let ids = batch_row_ids(&batch);
        assert_eq!(ids.iter().filter(|&&k| k < 1000).count(), want, "ratio {ratio}");
    }
    // An empty model pool: every row from env (and the other way round).
    let empty = ReplayBuffer::new(OBS, ACT, 10);
    sample_mixed(&env, &empty, 0.05, &mut rng, &mut batch);
    assert!(batch_row_ids(&batch).iter().all(|&k| k < 1000));
    sample_mixed(&empty, &model, 0.05, &mut rng, &mut batch);
    assert!(batch_row_ids(&batch).iter().all(|&k| k >= 1000));
    assert!(matches!(try_sample_mixed(&empty, &empty, 0.05, &mut rng, &mut batch), Err(Error::EmptyBuffer)));
    assert!(matches!(try_sample_mixed(&env, &model, 1.5, &mut rng, &mut batch), Err(Error::RealRatio(_))));
    let other = ReplayBuffer::new(OBS + 1, ACT, 10);
    assert!(matches!(try_sample_mixed(&env, &other, 0.5, &mut rng, &mut batch), Err(Error::MixedWidths { .. })));
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ddppo-buffer-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn wrapped_buffer() -> ReplayBuffer {
    let mut buf = ReplayBuffer::new(OBS, ACT, 7);
    for k in 0..11 {
        push_row(&mut buf, k);
    }
    buf
}

#[test]
fn save_load_round_trips_exactly() {
    let dir = temp_dir("roundtrip");
    for buf in [wrapped_buffer(), ReplayBuffer::new(OBS, ACT, 5), {
        let mut b = ReplayBuffer::new(OBS, ACT, 50);
        (0..9).for_each(|k| push_row(&mut b, k));
        b
    }] {
        let path = dir.join("buf.bin");
        buf.save(&path).unwrap();
        let back = ReplayBuffer::load(&path).unwrap();
        assert_eq!(back, buf);
        assert!(!dir.join("buf.bin.tmp").exists());
        // The ring continues where it stopped.
        let (mut a, mut b) = (buf.clone(), back);
        push_row(&mut a, 99);
        push_row(&mut b, 99);
        assert_eq!(a.newest(usize::MAX), b.newest(usize::MAX));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn damaged_files_are_clear_errors() {
    let dir = temp_dir("damaged");
    let path = dir.join("buf.bin");
    wrapped_buffer().save(&path).unwrap();
    let good = std::fs::read(&path).unwrap();
    let bad = dir.join("bad.bin");
    let load_bytes = |bytes: &[u8]| {
        std::fs::write(&bad, bytes).unwrap();
        ReplayBuffer::load(&bad).unwrap_err()
    };
    // Truncated anywhere: in the header, in the payload, by one byte.
    for cut in [0, 5, 30, 60, good.len() - 1] {
        let err = load_bytes(&good[..cut]);
        assert!(matches!(err, Error::Corrupt { .. } | Error::NotABuffer { .. }), "cut {cut}: {err}");
    }
    assert!(load_bytes(&good[..good.len() - 1]).to_string().contains("truncated or trailing"));
    let mut longer = good.clone();
    longer.push(0);
    assert!(matches!(load_bytes(&longer), Error::Corrupt { .. }));
    // One flipped bit in the payload.
    let mut flipped = good.clone();
    flipped[70] ^= 0x10;
    let err = load_bytes(&flipped);
    assert!(err.to_string().ends_with("corrupted replay buffer file: checksum mismatch"), "{err}");
    let mut magic = good.clone();
    magic[0] = b'X';
    assert!(matches!(load_bytes(&magic), Error::NotABuffer { .. }));
    let mut version = good.clone();
    version[8] = 2;
    let err = load_bytes(&version);
    assert!(matches!(err, Error::UnsupportedVersion { found: 2, supported: 1, .. }), "{err}");
    // A forged header (huge len) must not allocate or panic.
    let mut forged = good.clone();
    forged[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
    forged[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(load_bytes(&forged), Error::Corrupt { .. }));
    assert!(matches!(ReplayBuffer::load(&dir.join("missing.bin")), Err(Error::Io { .. })));
    // Saving into a missing directory fails cleanly and leaves nothing behind.
    assert!(matches!(wrapped_buffer().save(&dir.join("no/such/dir/x.bin")), Err(Error::Io { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}
