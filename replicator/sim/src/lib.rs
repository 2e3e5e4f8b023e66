//! Deterministic simulation of Tandem replicas.
//!
//! A run ([`run`]) builds 2–3 nodes around the real
//! [`tandem_core::repl::Replica`], with in-memory disks that lose unflushed
//! writes on a crash ([`disk`]), ordered reliable links that can be delayed,
//! partitioned and broken, a virtual clock and one seeded xorshift RNG
//! ([`rng`]). A random workload of overlapping writes, TRIM, WRITE_ZEROES,
//! FUA and flushes runs on the primary while faults hit the links and the
//! nodes (Primaries too, also mid-resync); a third of the two-node runs
//! have a witness (the core's `witness::Arbiter`, with a `QuorumCtl` per
//! replica and its own cuttable links) and fail over. The invariants of
//! [`check`] are checked on every completion, after every step and at
//! quiescence points (see `docs/replication.md`).
//!
//! Everything follows from the seed, so a failing seed replays exactly:
//! [`replay_command`].

pub mod check;
pub mod disk;
pub mod rng;
mod world;

pub use world::{
    run, run_with, Bug, Failure, Options, Stats, BLOCKS, BS, MAX_IN_FLIGHT, OPS_PER_PHASE, PHASES,
};

/// The command that replays `seed` with a trace.
pub fn replay_command(seed: u64) -> String {
    format!(
        "TANDEM_SIM_SEED={seed} cargo test -p tandem-sim --release -- --exact replay --nocapture"
    )
}
