//! Temperature updates must not grow memory. Its own test binary: the
//! resident set of the process is the measurement, so no other test may run
//! beside it.
//!
//! The leak this guards against: the gradient of `log_alpha` came out of
//! candle's backward pass still attached to the graph (`exp`'s gradient is
//! `grad * exp(log_alpha)`, a tracked op), so each Adam moment built from it
//! referenced the previous moment, and every update added a link to a chain
//! that was never freed (about 4 KB per update).

use ddppo_agent::{Agent, AgentConfig, Variant};

/// Resident set size of this process in bytes (`/proc/self/statm`, field 2,
/// in pages).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("statm field 2");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page as u64
}

#[test]
fn twenty_thousand_temperature_updates_keep_memory_flat() {
    // Tiny networks and batches: the updates themselves allocate little, so
    // anything kept alive per update shows.
    let mut cfg = AgentConfig::preset("pendulum").unwrap();
    cfg.variant = Variant::Sac;
    cfg.hidden = vec![8, 8];
    cfg.batch_size = 8;
    cfg.start_steps = 64;
    cfg.min_pool_size = 64;
    cfg.replay_size = 64;
    cfg.eval_every = 1_000_000;
    cfg.eval_episodes = 1;
    cfg.epochs = 1_000;
    assert!(cfg.learn_alpha);
    let mut agent = Agent::new(cfg).unwrap();
    // Fill D_env (no updates happen before min_pool_size).
    for _ in 0..63 {
        agent.step().unwrap();
    }
    let alpha0 = agent.temperature.alpha().unwrap();
    // Warm up allocator pools and caches before the baseline.
    for _ in 0..2_000 {
        agent.update_policy_sac().unwrap();
    }
    let before = rss_bytes();
    for _ in 0..20_000 {
        agent.update_policy_sac().unwrap();
    }
    let after = rss_bytes();
    let growth = after.saturating_sub(before);
    eprintln!(
        "RSS {:.1} MB -> {:.1} MB over 20,000 temperature updates (+{:.2} MB)",
        before as f64 / 1e6,
        after as f64 / 1e6,
        growth as f64 / 1e6
    );
    // The updates did run: alpha moved and the optimiser counted them.
    assert_ne!(agent.temperature.alpha().unwrap(), alpha0);
    assert_eq!(agent.alpha_opt.step, 22_000);
    // The mechanism itself: no optimiser's moments hold a graph.
    for opt in [&agent.alpha_opt, &agent.policy_opt, &agent.critic_opt] {
        let (m, v) = opt.moments();
        assert!(m.iter().chain(v).all(|t| !t.track_op()), "an Adam moment is still in the autograd graph");
    }
    assert!(growth < 10_000_000, "RSS grew by {growth} bytes over 20,000 temperature updates");
}
