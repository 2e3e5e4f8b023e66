//! Seed runs of the deterministic simulation.

use std::time::Instant;

use tandem_sim::{run, run_with, Bug, Options};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs `TANDEM_SIM_SEEDS` seeds (default 1000) from `TANDEM_SIM_SEED_BASE`
/// (default 0); the first failure prints its seed and replay command.
#[test]
fn many_seeds() {
    let count = env_u64("TANDEM_SIM_SEEDS").unwrap_or(1000);
    let base = env_u64("TANDEM_SIM_SEED_BASE").unwrap_or(0);
    let start = Instant::now();
    let (mut completed, mut faults, mut checks, mut conflicts, mut up, mut steps) =
        (0, 0, 0, 0, 0, 0);
    let (mut dual, mut proto_a, mut three) = (0, 0, 0);
    let (mut resyncs, mut resync_bytes, mut verifies, mut detaches) = (0, 0, 0, 0);
    let (mut witness_runs, mut failovers, mut primary_crashes, mut resync_crashes) = (0, 0, 0, 0);
    let (mut witness_cuts, mut witness_crashes, mut held_failed, mut solo_writes) = (0, 0, 0, 0);
    let (mut csum_runs, mut compared, mut identical) = (0, 0, 0);
    for seed in base..base + count {
        match run(seed) {
            Ok(s) => {
                completed += s.completed;
                faults += s.faults;
                checks += s.durability_checks;
                conflicts += s.conflicts;
                up += s.up_to_date_at_end;
                steps += s.steps;
                dual += u64::from(s.dual);
                proto_a += u64::from(!s.protocol_c);
                three += u64::from(s.nodes == 3);
                resyncs += s.resyncs;
                resync_bytes += s.resync_bytes;
                verifies += s.verifies;
                detaches += s.detaches;
                witness_runs += u64::from(s.witness);
                failovers += s.failovers;
                primary_crashes += s.primary_crashes;
                resync_crashes += s.resync_crashes;
                witness_cuts += s.witness_cuts;
                witness_crashes += s.witness_crashes;
                held_failed += s.held_failed;
                solo_writes += s.solo_writes;
                csum_runs += u64::from(s.checksums);
                compared += s.resync_compared_bytes;
                identical += s.resync_identical_bytes;
            }
            Err(f) => panic!("{f}"),
        }
    }
    println!(
        "{count} seeds in {:?}: {completed} requests, {faults} faults, {checks} durability checks, \
         {conflicts} dual-primary conflicts, {up} secondaries UpToDate at the end, {steps} steps, \
         {resyncs} resyncs moving {resync_bytes} bytes, {verifies} online verifies, {detaches} disks detached and re-attached; \
         runs: {dual} dual-primary, {proto_a} protocol A, {three} with 3 nodes, {witness_runs} with a witness; \
         {primary_crashes} Primary crashes, {resync_crashes} crashes during a resync, {failovers} failovers, \
         {witness_cuts} witness partitions, {witness_crashes} witness crashes, {solo_writes} writes completed alone with a grant, \
         {held_failed} held writes failed by the loser; \
         {csum_runs} runs with checksum-based resync: {compared} bytes compared, {identical} identical (not sent)",
        start.elapsed()
    );
    assert!(checks > count, "durability checks barely ran");
    assert!(resyncs > count, "resyncs barely ran");
    assert!(verifies > count, "online verifies barely ran");
    assert!(count < 100 || detaches > 0, "no disk ever failed");
    if count >= 100 {
        assert!(witness_runs > 0, "no run had a witness");
        assert!(primary_crashes > 0, "no Primary ever crashed");
        assert!(resync_crashes > 0, "no node crashed during a resync");
        assert!(failovers > 0, "no failover happened");
        assert!(witness_cuts > 0, "no witness partition happened");
        assert!(
            csum_runs > 0 && compared > 0,
            "no checksum-based resync ran"
        );
        assert!(
            identical > 0,
            "no checksum-based resync found identical data"
        );
    }
}

/// Replays `TANDEM_SIM_SEED` with a full trace.
#[test]
fn replay() {
    let Some(seed) = env_u64("TANDEM_SIM_SEED") else {
        println!("skipping: set TANDEM_SIM_SEED=<seed> to replay one seed");
        return;
    };
    match run_with(Options {
        seed,
        trace: true,
        bug: Bug::None,
    }) {
        Ok(s) => println!("seed={seed} passes: {s:?}"),
        Err(f) => {
            for l in &f.trace {
                println!("{l}");
            }
            panic!("{f}");
        }
    }
}

fn first_failure(bug: Bug) -> Option<String> {
    (0..200).find_map(|seed| {
        run_with(Options {
            seed,
            trace: false,
            bug,
        })
        .err()
        .map(|f| f.to_string())
    })
}

/// The durability check fails when secondaries acknowledge flushes and FUA
/// without persisting.
#[test]
fn checker_catches_a_lying_disk() {
    let f = first_failure(Bug::LyingSecondaryDisk).expect("lying disks went unnoticed");
    assert!(f.contains("durably"), "{f}");
    assert!(f.contains("seed=") && f.contains("--exact replay"), "{f}");
}

/// The content checks fail when a secondary acknowledges writes it lost.
#[test]
fn checker_catches_lost_writes() {
    let f = first_failure(Bug::LossySecondaryDisk).expect("lost writes went unnoticed");
    assert!(
        f.contains("differs") || f.contains("durably") || f.contains("last completed"),
        "{f}"
    );
}

/// Same seed, same run.
#[test]
fn runs_are_deterministic() {
    for seed in [1, 2, 3] {
        let a = format!("{:?}", run(seed).map_err(|f| f.to_string()));
        let b = format!("{:?}", run(seed).map_err(|f| f.to_string()));
        assert_eq!(a, b);
    }
}
