//! One simulated run: nodes, disks, links, the workload, faults and checks.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tandem_core::repl::{
    Config, ConnState, DiskState, Event, Frame, Input, IoId, LoadedMeta, MetaAt, Op, Output,
    PeerId, Protocol, ReplState, Replica, ReqId, Role, Time,
};

use tandem_core::witness::{
    Arbiter, NoQuorum, Note, QuorumCtl, QuorumOutput, ToWitness, Verdict, VolumeState,
};

use crate::check::{self, block_content, tag_of, Model};
use crate::disk::SimDisk;
use crate::rng::Rng;

/// Block size of the simulated volume.
pub const BS: usize = 512;
/// Blocks in the simulated volume (small, so writes overlap often).
pub const BLOCKS: usize = 64;
/// Frontend requests issued per phase.
pub const OPS_PER_PHASE: u64 = 200;
/// Phases per run; each ends with healing, quiescence and the full checks.
pub const PHASES: u32 = 4;
/// Most frontend requests in flight per primary.
pub const MAX_IN_FLIGHT: usize = 8;
const KEEPALIVE: Duration = Duration::from_millis(100);
const PEER_TIMEOUT: Duration = Duration::from_millis(500);
const QUIESCE_DEADLINE: Duration = Duration::from_secs(30);
const CHAOS_DEADLINE: Duration = Duration::from_secs(120);
const MS: u64 = 1_000_000;
/// Bytes per bitmap bit in the simulation (one block, so partial-chunk
/// logic and whole-chunk clears are both exercised with 2-block writes).
const CHUNK: u32 = 1024;
/// Extent of unflushed-write tracking.
const EXTENT: u64 = 4096;
/// How long a Secondary waits for a lost Primary before asking the
/// witness to take over.
const FAILOVER_TIMEOUT: Duration = Duration::from_millis(200);
/// How often a replica's quorum driver ticks.
const QUORUM_TICK: Duration = Duration::from_millis(10);
/// Longest chaos phase of a witness run (its writes may be suspended).
const WITNESS_CHAOS: Duration = Duration::from_secs(5);
/// The volume's key at the witness.
const VOLUME_KEY: &str = "tandem-sim-vol-1";

/// A deliberate defect, to prove the checks can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bug {
    /// No defect.
    #[default]
    None,
    /// Secondaries' disks ignore flushes and FUA (acknowledge without
    /// persisting): the durability check (a) must catch it.
    LyingSecondaryDisk,
    /// Secondaries' disks acknowledge some writes without applying them:
    /// the content checks (c)/(d) must catch it.
    LossySecondaryDisk,
}

/// How to run one seed.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The seed: everything in the run follows from it.
    pub seed: u64,
    /// Record a trace of every output (for replays).
    pub trace: bool,
    /// Deliberate defect (tests of the checker).
    pub bug: Bug,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Replicas (2 or 3).
    pub nodes: usize,
    /// Protocol C (true) or A.
    pub protocol_c: bool,
    /// Dual-primary run.
    pub dual: bool,
    /// Frontend requests completed.
    pub completed: u64,
    /// Faults injected.
    pub faults: u64,
    /// Durability checks performed (replica × flush/FUA completion).
    pub durability_checks: u64,
    /// `ConcurrentWriteConflict` events.
    pub conflicts: u64,
    /// `PeerOutdated` events.
    pub outdated: u64,
    /// Resyncs finished (counted on the source).
    pub resyncs: u64,
    /// Bytes moved by resyncs.
    pub resync_bytes: u64,
    /// The run used checksum-based resync (R26).
    pub checksums: bool,
    /// Bytes checksum-based resyncs compared by digest.
    pub resync_compared_bytes: u64,
    /// Of those, bytes found identical and not sent.
    pub resync_identical_bytes: u64,
    /// Online verifies that compared the whole volume (R22).
    pub verifies: u64,
    /// Disks detached after an I/O error (R23), each re-attached by a
    /// restart.
    pub detaches: u64,
    /// The run had a witness (R25).
    pub witness: bool,
    /// Automatic failovers (a Secondary promoted with the witness's grant).
    pub failovers: u64,
    /// Crashes of the Primary.
    pub primary_crashes: u64,
    /// Crashes of a node while it resynced a peer or was resynced.
    pub resync_crashes: u64,
    /// Faults cutting a replica from the witness (including isolating the
    /// Primary from peers and witness at once).
    pub witness_cuts: u64,
    /// Witness crashes (its state survives).
    pub witness_crashes: u64,
    /// Held writes failed when their node lost the arbitration.
    pub held_failed: u64,
    /// Chaos phases of witness runs ended by time, writes suspended.
    pub stalled_phases: u64,
    /// Writes completed while a peer did not get them (with the grant).
    pub solo_writes: u64,
    /// Secondaries still replicated (UpToDate) at the last check.
    pub up_to_date_at_end: u64,
    /// Virtual time at the end.
    pub virtual_time: Duration,
    /// Loop iterations.
    pub steps: u64,
}

/// A failed run.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The seed that fails.
    pub seed: u64,
    /// Which invariant broke and how.
    pub message: String,
    /// Trace lines (empty unless [`Options::trace`]).
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed={}: {}\nreplay: {}",
            self.seed,
            self.message,
            crate::replay_command(self.seed)
        )
    }
}

/// A local I/O of a node.
enum SimIo {
    Op(Op),
    Meta(MetaAt, Bytes),
    Read(u64, u64),
}

struct PendingIo {
    due: Time,
    io: IoId,
    op: SimIo,
    mark: u64,
    fail: bool,
}

struct Node {
    name: String,
    cfg: Config,
    r: Option<Replica>,
    disk: SimDisk,
    /// Metadata blocks written (durable: they survive crashes).
    meta: BTreeMap<MetaAt, Bytes>,
    ios: Vec<PendingIo>,
    restart_at: Option<Time>,
    in_flight: usize,
    issuer: bool,
    /// The driver's quorum logic (witness runs only).
    qc: Option<QuorumCtl>,
    qtick_at: Option<Time>,
    /// A verdict arrived on the current witness connection.
    verdict_seen: bool,
}

/// The connection between replica `node` and the witness.
struct WLink {
    up: bool,
    gen: u64,
    cut_until: Option<Time>,
    reconnect_at: Option<Time>,
    to_w: VecDeque<(Time, ToWitness)>,
    to_r: VecDeque<(Time, Verdict)>,
}

/// The witness: its decisions, its durable state, its links.
struct WitnessSim {
    arbiter: Option<Arbiter>,
    /// What its state file holds (survives its crashes).
    durable: BTreeMap<String, VolumeState>,
    restart_at: Option<Time>,
    links: Vec<WLink>,
}

#[derive(Default)]
struct Dir {
    q: VecDeque<(Time, BytesMut)>,
    last: Time,
}

struct Link {
    a: usize,
    b: usize,
    up: bool,
    gen: u64,
    partitioned_until: Option<Time>,
    extra_latency: u64,
    delay_until: Option<Time>,
    reconnect_at: Option<Time>,
    dirs: [Dir; 2],
}

struct Pending {
    node: usize,
    durable: bool,
    /// Peers replicated to when issued, with the link generation then.
    qualifying: Vec<(usize, u64)>,
    /// Peers it was sent to (replicating or being resynced) when issued.
    sent_to: Vec<usize>,
    write: bool,
}

fn pid(from: usize, to: usize) -> PeerId {
    PeerId(if to < from { to } else { to - 1 } as u8)
}

fn node_of(from: usize, p: PeerId) -> usize {
    let p = p.0 as usize;
    if p < from {
        p
    } else {
        p + 1
    }
}

fn summarize(o: &Output) -> String {
    match o {
        Output::Send {
            peer,
            frame:
                Frame::Write {
                    id,
                    offset,
                    fua,
                    data,
                },
        } => format!(
            "send {peer:?} Write id={id} off={offset} len={} fua={fua}",
            data.len()
        ),
        Output::LocalIo {
            io,
            op: Op::Write { offset, data, fua },
        } => format!(
            "localio {io:?} Write off={offset} len={} fua={fua}",
            data.len()
        ),
        o => format!("{o:?}"),
    }
}

/// The simulated world of one run.
struct World {
    opts: Options,
    rng: Rng,
    now: Time,
    nodes: Vec<Node>,
    links: Vec<Link>,
    model: Model,
    pending: BTreeMap<u64, Pending>,
    next_req: u64,
    issue_at: Time,
    issued: u64,
    chaos: bool,
    next_fault: Option<Time>,
    faults: bool,
    dual: bool,
    protocol: Protocol,
    stats: Stats,
    trace: Vec<String>,
    witness: Option<WitnessSim>,
    /// Primaries may crash in this run.
    crash_primary: bool,
    /// The node the workload writes to (non-dual runs).
    primary: usize,
    /// The primary crashed: the next node to become Primary takes over.
    primary_lost: bool,
    /// Per node: completed writes a peer did not get, not yet resynced.
    solo: Vec<bool>,
    /// Per node: Primary at the last check.
    was_primary: Vec<bool>,
}

impl World {
    fn new(opts: Options) -> World {
        let mut rng = Rng::new(opts.seed);
        let dual = rng.chance(1, 8);
        let n = if dual {
            2
        } else {
            2 + rng.range(0, 2) as usize
        };
        let protocol = if dual || rng.chance(3, 4) {
            Protocol::C
        } else {
            Protocol::A
        };
        // Dual-primary runs have no faults: a disconnect while both write is
        // a split brain, which needs an operator (or an automatic policy,
        // not implemented yet) to resolve.
        let faults = !dual && rng.chance(4, 5);
        let fixed_rate = rng.chance(1, 4);
        // Checksum-based resync (R26) on 1 seed in 4, chosen from the seed
        // itself so the other draws (and so older seeds' runs) stay as
        // they were.
        let checksums = opts.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 62 == 1;
        // A witness on 1 in 3 two-node runs with faults, protocol C.
        let with_witness = !dual && faults && n == 2 && protocol == Protocol::C && rng.chance(1, 3);
        // Primaries crash on half the runs. The activity log covers the
        // whole volume on 1 run in 4 and half of it otherwise, so extents
        // are evicted (R20: after a local flush) on most runs.
        let crash_primary = rng.chance(1, 2);
        let al_extents = if rng.chance(1, 4) {
            BLOCKS * BS / EXTENT as usize
        } else {
            4
        };
        let names = ["alpha", "bravo", "charlie"];
        let nodes = (0..n)
            .map(|i| {
                let peers = (0..n)
                    .filter(|j| *j != i)
                    .map(|j| names[j].to_owned())
                    .collect();
                let mut cfg = Config::new(
                    names[i],
                    *b"tandem-sim-vol-1",
                    (BLOCKS * BS) as u64,
                    BS as u32,
                    peers,
                );
                cfg.protocol = protocol;
                cfg.keepalive_interval = KEEPALIVE;
                cfg.peer_timeout = PEER_TIMEOUT;
                cfg.allow_two_primaries = dual;
                cfg.bitmap_chunk = CHUNK;
                cfg.extent_size = EXTENT;
                cfg.al_extents = al_extents;
                // A fixed resync rate on 1 seed in 4 (32 KiB/s: a full
                // resync of the 32 KiB volume takes a second).
                cfg.resync_rate = if fixed_rate { 32 << 10 } else { 0 };
                cfg.resync_checksums = checksums;
                cfg.gen_seed = rng.next_u64();
                cfg.solo_needs_grant = with_witness;
                let issuer = i == 0 || (dual && i == 1);
                if issuer {
                    cfg.initial_role = Role::Primary;
                }
                let mut disk = SimDisk::new(BLOCKS, BS);
                disk.lying = opts.bug == Bug::LyingSecondaryDisk && !issuer;
                Node {
                    name: names[i].to_owned(),
                    r: Some(Replica::new(cfg.clone(), Time::ZERO).expect("valid sim config")),
                    cfg,
                    disk,
                    meta: BTreeMap::new(),
                    ios: Vec::new(),
                    restart_at: None,
                    in_flight: 0,
                    issuer,
                    qc: with_witness.then(new_qc),
                    qtick_at: with_witness.then_some(Time::ZERO),
                    verdict_seen: false,
                }
            })
            .collect();
        let mut links = Vec::new();
        for a in 0..n {
            for b in a + 1..n {
                links.push(Link {
                    a,
                    b,
                    up: false,
                    gen: 0,
                    partitioned_until: None,
                    extra_latency: 0,
                    delay_until: None,
                    reconnect_at: Some(Time::ZERO),
                    dirs: Default::default(),
                });
            }
        }
        World {
            stats: Stats {
                nodes: n,
                protocol_c: protocol == Protocol::C,
                dual,
                witness: with_witness,
                checksums,
                ..Stats::default()
            },
            witness: with_witness.then(|| WitnessSim {
                arbiter: Some(Arbiter::default()),
                durable: BTreeMap::new(),
                restart_at: None,
                links: (0..n)
                    .map(|_| WLink {
                        up: false,
                        gen: 0,
                        cut_until: None,
                        reconnect_at: Some(Time::ZERO),
                        to_w: VecDeque::new(),
                        to_r: VecDeque::new(),
                    })
                    .collect(),
            }),
            crash_primary,
            primary: 0,
            primary_lost: false,
            solo: vec![false; n],
            was_primary: (0..n).map(|i| i == 0 || (dual && i == 1)).collect(),
            opts,
            rng,
            now: Time::ZERO,
            nodes,
            links,
            model: Model::new(BLOCKS),
            pending: BTreeMap::new(),
            next_req: 1,
            issue_at: Time::ZERO,
            issued: 0,
            chaos: false,
            next_fault: None,
            faults,
            dual,
            protocol,
            trace: Vec::new(),
        }
    }

    fn log(&mut self, f: impl FnOnce() -> String) {
        if self.opts.trace {
            let line = format!("{:>14} {}", self.now.as_nanos(), f());
            self.trace.push(line);
        }
    }

    fn link_idx(&self, i: usize, j: usize) -> usize {
        let (a, b) = (i.min(j), i.max(j));
        self.links
            .iter()
            .position(|l| l.a == a && l.b == b)
            .expect("every pair has a link")
    }

    fn run(&mut self) -> Result<(), String> {
        // Let the first handshakes finish before the workload starts.
        self.quiesce()?;
        for phase in 0..PHASES {
            self.log(|| format!("=== phase {phase}: chaos"));
            self.chaos = true;
            self.issued = 0;
            self.issue_at = self.now;
            self.next_fault = self
                .faults
                .then(|| self.now + Duration::from_nanos(self.rng.range(MS, 20 * MS)));
            let deadline = self.now + CHAOS_DEADLINE;
            // With a witness, a Primary cut off from peer and witness
            // suspends its writes (R25): the phase may stall, and ends
            // after WITNESS_CHAOS of virtual time.
            let stall_end = self.now + WITNESS_CHAOS;
            while self.issued < OPS_PER_PHASE {
                if self.witness.is_some() && self.now > stall_end {
                    self.stats.stalled_phases += 1;
                    break;
                }
                self.step()?;
                if self.now > deadline {
                    return Err(format!(
                        "no progress: {} of {OPS_PER_PHASE} requests issued after {CHAOS_DEADLINE:?} (liveness): {}",
                        self.issued,
                        self.describe()
                    ));
                }
            }
            self.chaos = false;
            self.next_fault = None;
            for l in &mut self.links {
                l.partitioned_until = None;
                l.extra_latency = 0;
                l.delay_until = None;
            }
            if let Some(w) = &mut self.witness {
                for l in &mut w.links {
                    l.cut_until = None;
                }
            }
            self.log(|| format!("=== phase {phase}: heal and quiesce"));
            self.quiesce()?;
            self.check_quiescent()?;
        }
        self.stats.virtual_time = Duration::from_nanos(self.now.as_nanos());
        Ok(())
    }

    fn quiesce(&mut self) -> Result<(), String> {
        let deadline = self.now + QUIESCE_DEADLINE;
        loop {
            self.drain_all()?;
            if self.quiescent() {
                return Ok(());
            }
            if self.now > deadline {
                return Err(format!(
                    "no quiescence within {QUIESCE_DEADLINE:?} after healing (liveness): {}",
                    self.describe()
                ));
            }
            self.step()?;
        }
    }

    fn describe(&self) -> String {
        let mut s = format!("primary=n{} ", self.primary);
        if let Some(w) = &self.witness {
            s += &format!(
                "[witness up={} state={:?} links={:?}] ",
                w.arbiter.is_some(),
                w.durable,
                w.links
                    .iter()
                    .map(|l| (l.up, l.cut_until.is_some()))
                    .collect::<Vec<_>>()
            );
        }
        for n in &self.nodes {
            match &n.r {
                None => s += &format!("[{} down] ", n.name),
                Some(r) => {
                    s += &format!(
                        "[{} {:?} {:?} reqs={} idle={} ios={} peers=",
                        n.name,
                        r.role(),
                        r.disk_state(),
                        r.requests_in_flight(),
                        r.is_idle(),
                        n.ios.len()
                    );
                    for p in 0..n.cfg.peers.len() {
                        if let Some(st) = r.peer_status(PeerId(p as u8)) {
                            s += &format!(
                                "{}:{:?}/{:?}/oos={}/sync={:?} ",
                                st.name, st.conn, st.repl, st.out_of_sync_bytes, st.sync
                            );
                        }
                    }
                    s += "] ";
                }
            }
        }
        s
    }

    fn quiescent(&self) -> bool {
        let primaries = self
            .nodes
            .iter()
            .filter(|n| n.r.as_ref().is_some_and(|r| r.role() == Role::Primary))
            .count();
        let witness_ok = self.witness.as_ref().is_none_or(|w| {
            w.arbiter.is_some()
                && w.links
                    .iter()
                    .all(|l| l.up && l.to_w.is_empty() && l.to_r.is_empty())
        });
        witness_ok
            && (self.dual
                || (primaries == 1
                    && self.nodes[self.primary]
                        .r
                        .as_ref()
                        .is_some_and(|r| r.role() == Role::Primary)))
            && self.pending.is_empty()
            && self.links.iter().all(|l| {
                l.up && l.partitioned_until.is_none() && l.dirs.iter().all(|d| d.q.is_empty())
            })
            && self.nodes.iter().all(|n| {
                n.ios.is_empty()
                    && n.r.as_ref().is_some_and(|r| {
                        r.is_idle()
                            && (0..n.cfg.peers.len()).all(|p| {
                                r.peer_status(PeerId(p as u8)).is_some_and(|s| {
                                    s.conn == ConnState::Connected && s.sync.is_none()
                                })
                            })
                    })
            })
    }

    fn step(&mut self) -> Result<(), String> {
        self.stats.steps += 1;
        self.drain_all()?;
        self.reattach_detached();
        self.operator();
        self.schedule_reconnects();
        let t = self
            .next_time()
            .ok_or_else(|| format!("nothing left to happen: {}", self.describe()))?;
        self.now = self.now.max(t);
        self.fire_due()?;
        self.drain_all()
    }

    /// A node whose disk failed detached it (R23); re-attaching is a
    /// restart with the disk healthy again: crash it now, back in 10–100 ms.
    fn reattach_detached(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].r.as_ref().is_some_and(|r| r.is_detached()) {
                continue;
            }
            let down = self.rng.range(10 * MS, 100 * MS);
            self.log(|| format!("n{i} detached its disk: restart in {down} ns"));
            self.stats.detaches += 1;
            self.crash_node(i, down);
        }
    }

    /// Crashes node `i` (its volatile disk cache is partly lost); it
    /// restarts `down` ns later as a Secondary.
    fn crash_node(&mut self, i: usize, down: u64) {
        if let Some(r) = &self.nodes[i].r {
            if r.role() == Role::Primary && !self.dual {
                self.stats.primary_crashes += 1;
                if i == self.primary {
                    self.primary_lost = true;
                }
            }
            if (0..self.nodes[i].cfg.peers.len()).any(|p| {
                r.peer_status(PeerId(p as u8))
                    .is_some_and(|s| s.sync.is_some())
            }) {
                self.stats.resync_crashes += 1;
            }
        }
        self.nodes[i].r = None;
        self.nodes[i].qc = None;
        self.nodes[i].ios.clear();
        let mut rng = self.rng.clone();
        self.nodes[i].disk.crash(&mut rng);
        self.rng = rng;
        self.nodes[i].restart_at = Some(self.now + Duration::from_nanos(down));
        // Its requests in flight die with it: never completed.
        self.pending.retain(|_, p| p.node != i);
        self.nodes[i].in_flight = 0;
        for j in 0..self.nodes.len() {
            if j != i {
                self.break_link(i, j);
            }
        }
        self.wlink_break(i);
    }

    /// The operator: when no node is Primary (the Primary crashed), the
    /// last Primary is promoted again once it is back — with a witness,
    /// only once the witness told it its standing and it is not outdated.
    fn operator(&mut self) {
        if self.dual
            || self
                .nodes
                .iter()
                .any(|n| n.r.as_ref().is_some_and(|r| r.role() == Role::Primary))
        {
            return;
        }
        // The last Primary, once it is back; if it cannot be (a handshake
        // between two Secondaries held it Outdated, waiting for the
        // other's promotion, R16), another UpToDate node. Never while the
        // last Primary is down: without a witness, taking over is an
        // operator's decision, and with one it is the failover's.
        if self.nodes[self.primary].r.is_none() {
            return;
        }
        let witness_ok = |w: &Self, i: usize| match &w.witness {
            None => true,
            Some(ws) => {
                ws.links[i].up
                    && w.nodes[i].verdict_seen
                    && w.nodes[i]
                        .qc
                        .as_ref()
                        .is_some_and(|q| q.may_promote().is_ok())
            }
        };
        let i = self.primary;
        if !witness_ok(self, i) {
            return;
        }
        let now = self.now;
        let Some(r) = &mut self.nodes[i].r else {
            return;
        };
        if r.promote(now).is_ok() {
            self.log(|| format!("operator: n{i} promoted again"));
            return;
        }
        if r.disk_state() == DiskState::UpToDate {
            return;
        }
        for j in (0..self.nodes.len()).filter(|j| *j != i) {
            if !witness_ok(self, j) {
                continue;
            }
            if let Some(r) = &mut self.nodes[j].r {
                if r.promote(now).is_ok() {
                    self.log(|| format!("operator: n{j} promoted (n{i} is not UpToDate)"));
                    return;
                }
            }
        }
    }

    fn conn_id(i: usize, gen: u64) -> u64 {
        ((i as u64) << 32) | gen
    }

    fn wlink_break(&mut self, i: usize) {
        let Some(w) = &mut self.witness else {
            return;
        };
        let l = &mut w.links[i];
        if !l.up {
            return;
        }
        l.up = false;
        l.to_w.clear();
        l.to_r.clear();
        let conn = Self::conn_id(i, l.gen);
        if let Some(a) = &mut w.arbiter {
            a.disconnected(conn);
        }
        self.nodes[i].verdict_seen = false;
        if let Some(q) = &mut self.nodes[i].qc {
            q.witness_down();
        }
        self.log(|| format!("witness link n{i} broken"));
    }

    fn wlink_up(&mut self, i: usize) {
        let Some(w) = &mut self.witness else {
            return;
        };
        let l = &mut w.links[i];
        l.up = true;
        l.gen += 1;
        l.to_w.clear();
        l.to_r.clear();
        self.nodes[i].verdict_seen = false;
        if let Some(q) = &mut self.nodes[i].qc {
            q.witness_up();
        }
        self.log(|| format!("witness link n{i} up"));
        self.qc_tick(i);
    }

    fn qc_tick(&mut self, i: usize) {
        let now = self.now;
        let n = &mut self.nodes[i];
        if let (Some(q), Some(r)) = (&mut n.qc, &mut n.r) {
            q.tick(r, now);
        }
        self.qc_flush(i);
    }

    fn qc_flush(&mut self, i: usize) {
        while let Some(o) = self.nodes[i].qc.as_mut().and_then(|q| q.poll()) {
            match o {
                QuorumOutput::Send(m) => {
                    self.log(|| format!("n{i} -> witness {m:?}"));
                    let lat = self.rng.range(50_000, 2 * MS);
                    let now = self.now;
                    if let Some(w) = &mut self.witness {
                        let l = &mut w.links[i];
                        if l.up {
                            let at = (now + Duration::from_nanos(lat))
                                .max(l.to_w.back().map_or(Time::ZERO, |(t, _)| *t));
                            l.to_w.push_back((at, m));
                        }
                    }
                }
                QuorumOutput::Note(n) => {
                    if n == Note::FailedOver {
                        self.stats.failovers += 1;
                    }
                    self.log(|| format!("n{i} quorum: {n:?}"));
                }
            }
        }
    }

    /// Witness restarts, link reconnects, message deliveries, quorum ticks.
    fn fire_witness(&mut self) -> Result<(), String> {
        let now = self.now;
        let Some(w) = &mut self.witness else {
            return Ok(());
        };
        if w.restart_at.is_some_and(|t| t <= now) {
            w.restart_at = None;
            w.arbiter = Some(Arbiter::new(w.durable.clone()));
            self.log(|| "witness restarted".to_string());
        }
        for i in 0..self.nodes.len() {
            let Some(w) = &mut self.witness else {
                return Ok(());
            };
            let l = &mut w.links[i];
            if l.cut_until.is_some_and(|t| t <= now) {
                l.cut_until = None;
            }
            if l.reconnect_at.is_some_and(|t| t <= now) {
                l.reconnect_at = None;
                if !l.up
                    && l.cut_until.is_none()
                    && w.arbiter.is_some()
                    && self.nodes[i].r.is_some()
                {
                    self.wlink_up(i);
                    self.drain_all()?;
                }
            }
            // To the witness.
            loop {
                let Some(w) = &mut self.witness else {
                    return Ok(());
                };
                let l = &mut w.links[i];
                if !l.up || l.to_w.front().is_none_or(|(t, _)| *t > now) {
                    break;
                }
                let Some((_, m)) = l.to_w.pop_front() else {
                    break;
                };
                let conn = Self::conn_id(i, l.gen);
                let Some(a) = &mut w.arbiter else {
                    break;
                };
                let (v, undo) = a.handle(&self.nodes[i].name, conn, m);
                if undo.is_some() {
                    w.durable = a.volumes().clone();
                }
                let lat = self.rng.range(50_000, 2 * MS);
                let l = &mut w.links[i];
                let at = (now + Duration::from_nanos(lat))
                    .max(l.to_r.back().map_or(Time::ZERO, |(t, _)| *t));
                let line = self.opts.trace.then(|| format!("witness -> n{i} {v:?}"));
                l.to_r.push_back((at, v));
                if let Some(line) = line {
                    self.log(|| line);
                }
            }
            // From the witness.
            loop {
                let Some(w) = &mut self.witness else {
                    return Ok(());
                };
                let l = &mut w.links[i];
                if !l.up || l.to_r.front().is_none_or(|(t, _)| *t > now) {
                    break;
                }
                let Some((_, v)) = l.to_r.pop_front() else {
                    break;
                };
                let wall = 1_700_000_000_000 + now.as_nanos() / MS;
                let n = &mut self.nodes[i];
                n.verdict_seen = true;
                if let (Some(q), Some(r)) = (&mut n.qc, &mut n.r) {
                    q.verdict(r, now, v, wall);
                }
                self.qc_flush(i);
                self.qc_tick(i);
                self.drain_all()?;
            }
            // Periodic tick.
            if self.nodes[i].r.is_some() && self.nodes[i].qtick_at.is_some_and(|t| t <= now) {
                self.nodes[i].qtick_at = Some(now + QUORUM_TICK);
                self.qc_tick(i);
                self.drain_all()?;
            }
        }
        Ok(())
    }

    fn schedule_reconnects(&mut self) {
        for k in 0..self.links.len() {
            let l = &self.links[k];
            let alive = self.nodes[l.a].r.is_some() && self.nodes[l.b].r.is_some();
            if !l.up && l.partitioned_until.is_none() && alive && l.reconnect_at.is_none() {
                let d = self.rng.range(MS, 20 * MS);
                self.links[k].reconnect_at = Some(self.now + Duration::from_nanos(d));
            }
        }
        for i in 0..self.nodes.len() {
            let alive = self.nodes[i].r.is_some();
            let Some(w) = &self.witness else {
                return;
            };
            let l = &w.links[i];
            if !l.up
                && l.cut_until.is_none()
                && alive
                && w.arbiter.is_some()
                && l.reconnect_at.is_none()
            {
                let d = self.rng.range(MS, 20 * MS);
                if let Some(w) = &mut self.witness {
                    w.links[i].reconnect_at = Some(self.now + Duration::from_nanos(d));
                }
            }
        }
    }

    fn next_time(&self) -> Option<Time> {
        let mut t: Option<Time> = None;
        let mut consider = |x: Option<Time>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for n in &self.nodes {
            consider(n.restart_at);
            if let Some(r) = &n.r {
                consider(r.poll_timeout());
                consider(n.ios.iter().map(|p| p.due).min());
            }
        }
        for l in &self.links {
            consider(l.partitioned_until);
            consider(l.delay_until);
            consider(l.reconnect_at);
            if l.up && l.partitioned_until.is_none() {
                for d in &l.dirs {
                    consider(d.q.front().map(|(t, _)| *t));
                }
            }
        }
        if let Some(w) = &self.witness {
            consider(w.restart_at);
            for l in &w.links {
                consider(l.cut_until);
                consider(l.reconnect_at);
                if l.up {
                    consider(l.to_w.front().map(|(t, _)| *t));
                    consider(l.to_r.front().map(|(t, _)| *t));
                }
            }
            for n in &self.nodes {
                if n.r.is_some() {
                    consider(n.qtick_at);
                }
            }
        }
        if self.chaos && self.issued < OPS_PER_PHASE {
            consider(Some(self.issue_at));
        }
        if self.chaos {
            consider(self.next_fault);
        }
        t
    }

    fn fire_due(&mut self) -> Result<(), String> {
        let now = self.now;
        // Restarts.
        for i in 0..self.nodes.len() {
            if self.nodes[i].restart_at.is_some_and(|t| t <= now) {
                self.nodes[i].restart_at = None;
                self.nodes[i].cfg.gen_seed = self.rng.next_u64();
                let mut cfg = self.nodes[i].cfg.clone();
                // A restarted node comes back Secondary; the operator (or
                // a failover) decides who is Primary.
                cfg.initial_role = Role::Secondary;
                if self.witness.is_some() {
                    self.nodes[i].qc = Some(new_qc());
                    self.nodes[i].qtick_at = Some(now);
                }
                let loaded = load_meta(&self.nodes[i].meta, &cfg)?;
                self.nodes[i].r =
                    Some(Replica::with_meta(cfg, loaded, now).map_err(|e| e.to_string())?);
                self.log(|| format!("n{i} restarted"));
            }
        }
        // Partitions and delays ending; reconnects.
        for k in 0..self.links.len() {
            let l = &mut self.links[k];
            if l.partitioned_until.is_some_and(|t| t <= now) {
                l.partitioned_until = None;
            }
            if l.delay_until.is_some_and(|t| t <= now) {
                l.delay_until = None;
                l.extra_latency = 0;
            }
            if l.reconnect_at.is_some_and(|t| t <= now) {
                l.reconnect_at = None;
                let (a, b) = (l.a, l.b);
                let alive = self.nodes[a].r.is_some() && self.nodes[b].r.is_some();
                if !l.up && l.partitioned_until.is_none() && alive {
                    l.up = true;
                    l.gen += 1;
                    l.dirs = Default::default();
                    self.log(|| format!("link n{a}-n{b} up"));
                    for (x, y) in [(a, b), (b, a)] {
                        if let Some(r) = &mut self.nodes[x].r {
                            r.handle(now, Input::PeerConnected { peer: pid(x, y) });
                        }
                    }
                    self.drain_all()?;
                }
            }
        }
        // Local I/O. Half the time the completions due together reach the
        // replica in one batch (as tandemd's driver hands over everything
        // waiting), otherwise one by one.
        for i in 0..self.nodes.len() {
            let batch = self.rng.chance(1, 2);
            if batch {
                self.batch(i, true);
            }
            while let Some(k) = (0..self.nodes[i].ios.len())
                .filter(|k| self.nodes[i].ios[*k].due <= now)
                .min_by_key(|k| (self.nodes[i].ios[*k].due, self.nodes[i].ios[*k].io))
            {
                let p = self.nodes[i].ios.remove(k);
                self.complete_io(i, p);
                if !batch {
                    self.drain_all()?;
                }
            }
            if batch {
                self.batch(i, false);
                self.drain_all()?;
            }
        }
        // Frame deliveries (batched half the time, as local I/O above).
        for k in 0..self.links.len() {
            for d in 0..2 {
                let to = if d == 0 {
                    self.links[k].b
                } else {
                    self.links[k].a
                };
                let batch = self.rng.chance(1, 2);
                if batch {
                    self.batch(to, true);
                }
                loop {
                    let l = &mut self.links[k];
                    if !l.up || l.partitioned_until.is_some() {
                        break;
                    }
                    if l.dirs[d].q.front().is_none_or(|(t, _)| *t > now) {
                        break;
                    }
                    let (_, mut buf) = l.dirs[d].q.pop_front().expect("checked");
                    let (from, to) = if d == 0 { (l.a, l.b) } else { (l.b, l.a) };
                    let frame = match Frame::decode(&mut buf) {
                        Ok(Some(f)) if buf.is_empty() => f,
                        other => return Err(format!("codec failure on a clean link: {other:?}")),
                    };
                    if let Some(r) = &mut self.nodes[to].r {
                        r.handle(
                            now,
                            Input::PeerFrame {
                                peer: pid(to, from),
                                frame,
                            },
                        );
                    }
                    if !batch {
                        self.drain_all()?;
                    }
                }
                if batch {
                    self.batch(to, false);
                    self.drain_all()?;
                }
            }
        }
        self.fire_witness()?;
        // Timers.
        for i in 0..self.nodes.len() {
            if let Some(r) = &mut self.nodes[i].r {
                if r.poll_timeout().is_some_and(|t| t <= now) {
                    r.handle_timeout(now);
                }
            }
            self.drain_all()?;
        }
        // Workload.
        if self.chaos && self.issued < OPS_PER_PHASE && self.issue_at <= now {
            self.issue();
            self.drain_all()?;
        }
        // Faults.
        if self.chaos && self.next_fault.is_some_and(|t| t <= now) {
            self.fault();
            self.next_fault = Some(now + Duration::from_nanos(self.rng.range(MS, 30 * MS)));
            self.drain_all()?;
        }
        Ok(())
    }

    /// Begins (`begin`) or ends a batch of inputs on node `i`, if it runs.
    fn batch(&mut self, i: usize, begin: bool) {
        if let Some(r) = &mut self.nodes[i].r {
            if begin {
                r.begin_batch();
            } else {
                r.end_batch();
            }
        }
    }

    fn complete_io(&mut self, i: usize, p: PendingIo) {
        let lose = self.opts.bug == Bug::LossySecondaryDisk
            && !self.nodes[i].issuer
            && matches!(p.op, SimIo::Op(Op::Write { .. }))
            && self.rng.chance(1, 10);
        let n = &mut self.nodes[i];
        let op = match p.op {
            SimIo::Op(op) => op,
            SimIo::Meta(at, data) => {
                n.meta.insert(at, data);
                if let Some(r) = &mut n.r {
                    r.handle(
                        self.now,
                        Input::LocalDone {
                            io: p.io,
                            result: Ok(()),
                        },
                    );
                }
                return;
            }
            SimIo::Read(offset, len) => {
                let first = offset as usize / BS;
                let mut d = BytesMut::with_capacity(len as usize);
                for b in first..first + len as usize / BS {
                    d.extend_from_slice(n.disk.current(b));
                }
                if let Some(r) = &mut n.r {
                    r.handle(
                        self.now,
                        Input::ReadDone {
                            io: p.io,
                            result: Ok(d.freeze()),
                        },
                    );
                }
                return;
            }
        };
        let result = if p.fail {
            Err(tandem_core::repl::errno::EIO)
        } else if lose {
            Ok(())
        } else {
            match &op {
                Op::Write { offset, data, fua } => n.disk.write(*offset as usize / BS, data, *fua),
                Op::Trim { offset, len, fua }
                | Op::WriteZeroes {
                    offset, len, fua, ..
                } => n.disk.zero(*offset as usize / BS, *len as usize / BS, *fua),
                Op::Flush => n.disk.flush(p.mark),
            }
            Ok(())
        };
        if let Some(r) = &mut n.r {
            r.handle(self.now, Input::LocalDone { io: p.io, result });
        }
    }

    fn drain_all(&mut self) -> Result<(), String> {
        loop {
            let mut any = false;
            for i in 0..self.nodes.len() {
                while let Some(o) = self.nodes[i].r.as_mut().and_then(|r| r.poll_output()) {
                    any = true;
                    self.route(i, o)?;
                }
            }
            if !any {
                break;
            }
        }
        let prims: Vec<usize> = (0..self.nodes.len())
            .filter(|i| {
                self.nodes[*i]
                    .r
                    .as_ref()
                    .is_some_and(|r| r.role() == Role::Primary)
            })
            .collect();
        if !self.dual {
            // A new Primary: a failover, or the old one promoted again
            // after its crash.
            let newp = prims
                .iter()
                .copied()
                .find(|k| *k != self.primary && !self.was_primary[*k])
                .or_else(|| {
                    (self.primary_lost && prims.contains(&self.primary)).then_some(self.primary)
                });
            for (i, w) in self.was_primary.iter_mut().enumerate() {
                *w = prims.contains(&i);
            }
            if let Some(k) = newp {
                self.take_over(k)?;
            }
            // A node that wrote alone is reconciled once all its peers are
            // Established again (what its release waits for).
            for i in 0..self.nodes.len() {
                if self.solo[i] {
                    let back = self.nodes[i].r.as_ref().is_some_and(|r| {
                        (0..self.nodes[i].cfg.peers.len()).all(|p| {
                            r.peer_status(PeerId(p as u8))
                                .is_some_and(|s| s.repl == ReplState::Established)
                        })
                    });
                    if back {
                        self.solo[i] = false;
                    }
                }
            }
        }
        // (b) With a witness, the Primary of the minority side stays one
        // until the witness tells it to stand down: two Primaries may
        // coexist across a partition, but only one completes writes its
        // peer did not get (checked on every completion).
        if self.witness.is_some() {
            return Ok(());
        }
        check::check_primaries(prims.len(), self.dual)
    }

    /// Node `k` became the Primary the workload writes to: it must hold
    /// every write a FLUSH or FUA acknowledged; the model starts again
    /// from its content.
    fn take_over(&mut self, k: usize) -> Result<(), String> {
        let disk = &self.nodes[k].disk;
        self.model
            .check_holds_acked(&self.nodes[k].name, |b| tag_of(disk.current(b), b))?;
        let durable = (0..BLOCKS)
            .map(|b| tag_of(disk.durable(b), b))
            .collect::<Result<Vec<_>, _>>()?;
        let current = (0..BLOCKS)
            .map(|b| tag_of(disk.current(b), b))
            .collect::<Result<Vec<_>, _>>()?;
        self.model.rebase(&durable, &current);
        let old = self.primary;
        self.log(|| format!("n{k} is the Primary now (was n{old})"));
        self.primary = k;
        self.primary_lost = false;
        Ok(())
    }

    fn route(&mut self, i: usize, o: Output) -> Result<(), String> {
        if self.opts.trace {
            let s = summarize(&o);
            self.log(|| format!("n{i} {s}"));
        }
        match o {
            Output::LocalIo { io, op } => {
                let mark = self.nodes[i].disk.flush_mark();
                let lat = if self.rng.chance(1, 20) {
                    self.rng.range(MS, 5 * MS)
                } else {
                    self.rng.range(5_000, 200_000)
                };
                let fail = self.chaos
                    && self.faults
                    && !self.nodes[i].issuer
                    && i != self.primary
                    && self.nodes.iter().all(|n| n.r.is_some())
                    && op != Op::Flush
                    && self.rng.chance(1, 400);
                self.nodes[i].ios.push(PendingIo {
                    due: self.now + Duration::from_nanos(lat),
                    io,
                    op: SimIo::Op(op),
                    mark,
                    fail,
                });
            }
            Output::MetaWrite { io, at, data } => {
                let lat = self.rng.range(5_000, 200_000);
                self.nodes[i].ios.push(PendingIo {
                    due: self.now + Duration::from_nanos(lat),
                    io,
                    op: SimIo::Meta(at, data),
                    mark: 0,
                    fail: false,
                });
            }
            Output::Read { io, offset, len } => {
                let lat = self.rng.range(5_000, 200_000);
                self.nodes[i].ios.push(PendingIo {
                    due: self.now + Duration::from_nanos(lat),
                    io,
                    op: SimIo::Read(offset, len),
                    mark: 0,
                    fail: false,
                });
            }
            Output::Send { peer, frame } => {
                let j = node_of(i, peer);
                let k = self.link_idx(i, j);
                if !self.links[k].up {
                    return Ok(());
                }
                let mut buf = BytesMut::with_capacity(frame.encoded_len());
                frame.encode(&mut buf);
                let base = self.rng.range(20_000, 500_000);
                let l = &mut self.links[k];
                let d = usize::from(i != l.a);
                let at =
                    (self.now + Duration::from_nanos(base + l.extra_latency)).max(l.dirs[d].last);
                l.dirs[d].last = at;
                l.dirs[d].q.push_back((at, buf));
            }
            Output::Complete { req, result } => self.on_complete(i, req, result)?,
            // The simulator issues no FrontendRead.
            Output::ReadComplete { .. } => {}
            // The simulator never asks a replica to grow (R29 is tested in
            // the core's unit tests and end to end).
            Output::Grow { size } => return Err(format!("n{i}: unexpected growth to {size}")),
            Output::Disconnect { peer, .. } => {
                let j = node_of(i, peer);
                self.break_link(i, j);
            }
            Output::Event(e) => match e {
                Event::ConcurrentWriteConflict { .. } => self.stats.conflicts += 1,
                Event::PeerOutdated { .. } => self.stats.outdated += 1,
                Event::SyncFinished {
                    role: tandem_core::repl::SyncRole::Source,
                    bytes,
                    ..
                } => {
                    self.stats.resyncs += 1;
                    self.stats.resync_bytes += bytes;
                }
                Event::SyncChecksums {
                    compared_bytes,
                    identical_bytes,
                    ..
                } => {
                    self.stats.resync_compared_bytes += compared_bytes;
                    self.stats.resync_identical_bytes += identical_bytes;
                }
                // R22: replicas in sync never differ, so any difference an
                // online verify reports is a false positive (writes in
                // flight mistaken for differences) — unless a disk is
                // deliberately lossy.
                Event::VerifyFinished {
                    peer,
                    differing_bytes,
                    ranges,
                    aborted,
                    ..
                } => {
                    if aborted.is_none() {
                        self.stats.verifies += 1;
                    }
                    if differing_bytes > 0 && self.opts.bug != Bug::LossySecondaryDisk {
                        return Err(format!(
                            "n{i}: online verify with n{} reported differing ranges {ranges:?}",
                            node_of(i, peer)
                        ));
                    }
                }
                _ => {}
            },
        }
        Ok(())
    }

    fn break_link(&mut self, i: usize, j: usize) {
        let k = self.link_idx(i, j);
        let l = &mut self.links[k];
        if !l.up {
            return;
        }
        l.up = false;
        l.dirs = Default::default();
        let (a, b) = (l.a, l.b);
        self.log(|| format!("link n{a}-n{b} broken"));
        for (x, y) in [(a, b), (b, a)] {
            if let Some(r) = &mut self.nodes[x].r {
                r.handle(self.now, Input::PeerDisconnected { peer: pid(x, y) });
            }
        }
    }

    fn link_gen(&self, i: usize, j: usize) -> Option<u64> {
        let l = &self.links[self.link_idx(i, j)];
        l.up.then_some(l.gen)
    }

    fn replicating(&self, i: usize, j: usize) -> bool {
        self.nodes[i]
            .r
            .as_ref()
            .and_then(|r| r.peer_status(pid(i, j)))
            .is_some_and(|s| s.repl == ReplState::Established)
    }

    /// Node `i` sends its writes to `j` (in sync, or being resynced).
    fn receiving(&self, i: usize, j: usize) -> bool {
        self.nodes[i]
            .r
            .as_ref()
            .and_then(|r| r.peer_status(pid(i, j)))
            .is_some_and(|s| matches!(s.repl, ReplState::Established | ReplState::SyncSource))
    }

    fn issue(&mut self) {
        let issuers: Vec<usize> = (0..self.nodes.len())
            .filter(|i| {
                let n = &self.nodes[*i];
                let writer = if self.dual {
                    n.issuer
                } else {
                    *i == self.primary && n.r.as_ref().is_some_and(|r| r.role() == Role::Primary)
                };
                writer && n.in_flight < MAX_IN_FLIGHT
            })
            .collect();
        self.issue_at = self.now + Duration::from_nanos(self.rng.range(10_000, 300_000));
        if issuers.is_empty() {
            return;
        }
        let i = issuers[self.rng.range(0, issuers.len() as u64) as usize];
        // Now and then an online verify from the issuer (R22); refused
        // unless the peer is in sync.
        if !self.dual && self.rng.chance(1, 20) {
            let j = (i + 1 + self.rng.range(0, self.nodes.len() as u64 - 1) as usize)
                % self.nodes.len();
            let now = self.now;
            if let Some(r) = &mut self.nodes[i].r {
                let _ = r.start_verify(now, pid(i, j), false);
            }
        }
        let req = self.next_req;
        self.next_req += 1;
        let n = self.rng.range(1, 5) as usize;
        let first = self.rng.range(0, (BLOCKS - n + 1) as u64) as usize;
        let fua = self.rng.chance(15, 100);
        let offset = (first * BS) as u64;
        let len = (n * BS) as u64;
        let roll = self.rng.range(0, 100);
        let op = if roll < 60 {
            let mut d = BytesMut::with_capacity(n * BS);
            for b in first..first + n {
                d.extend_from_slice(&block_content(req, b, BS));
            }
            Op::Write {
                offset,
                data: d.freeze(),
                fua,
            }
        } else if roll < 75 {
            Op::Flush
        } else if roll < 87 {
            Op::Trim { offset, len, fua }
        } else {
            Op::WriteZeroes {
                offset,
                len,
                no_hole: self.rng.chance(1, 2),
                fua,
            }
        };
        if !self.dual {
            match &op {
                Op::Write { .. } => self.model.issue_write(req, first, n, req),
                Op::Flush => self.model.issue_flush(req),
                _ => self.model.issue_write(req, first, n, 0),
            }
        }
        let qualifying = (0..self.nodes.len())
            .filter(|j| *j != i && self.replicating(i, *j))
            .filter_map(|j| self.link_gen(i, j).map(|g| (j, g)))
            .collect();
        let sent_to = (0..self.nodes.len())
            .filter(|j| *j != i && self.receiving(i, *j))
            .collect();
        self.pending.insert(
            req,
            Pending {
                node: i,
                durable: op.is_durable(),
                qualifying,
                sent_to,
                write: op != Op::Flush,
            },
        );
        self.nodes[i].in_flight += 1;
        self.issued += 1;
        let now = self.now;
        if let Some(r) = &mut self.nodes[i].r {
            r.handle(
                now,
                Input::Frontend {
                    req: ReqId(req),
                    op,
                },
            );
        }
    }

    fn on_complete(&mut self, i: usize, req: ReqId, result: Result<(), i32>) -> Result<(), String> {
        let Some(p) = self.pending.remove(&req.0) else {
            return Err(format!("n{i}: completion of unknown request {}", req.0));
        };
        if p.node != i {
            return Err(format!("request {} completed on the wrong node", req.0));
        }
        self.nodes[i].in_flight -= 1;
        if let Err(e) = result {
            if self.witness.is_some() && e == tandem_core::repl::errno::EIO {
                // Held writes of a node that lost the arbitration.
                self.stats.held_failed += 1;
                return Ok(());
            }
            return Err(format!(
                "n{i}: request {} failed with errno {e} (no primary fault is injected)",
                req.0
            ));
        }
        self.stats.completed += 1;
        if self.dual {
            return Ok(());
        }
        // R25: a write a peer did not get completes only on the node the
        // witness lets write alone, and on one node at a time.
        if self.witness.is_some() && p.write {
            let missing: Vec<usize> = (0..self.nodes.len())
                .filter(|j| *j != i && !p.sent_to.contains(j) && !self.receiving(i, *j))
                .collect();
            if let Some(j) = missing.first() {
                let holder = self
                    .witness
                    .as_ref()
                    .and_then(|w| w.durable.get(VOLUME_KEY))
                    .and_then(|v| v.holder.clone());
                if holder.as_deref() != Some(self.nodes[i].name.as_str()) {
                    return Err(format!(
                        "n{i} completed write {} that n{j} did not get, without the witness's grant (holder {holder:?})",
                        req.0
                    ));
                }
                if let Some(k) = (0..self.nodes.len()).find(|k| *k != i && self.solo[*k]) {
                    return Err(format!(
                        "n{i} completed write {} alone while n{k} also wrote alone",
                        req.0
                    ));
                }
                self.solo[i] = true;
                self.stats.solo_writes += 1;
            }
        }
        if !self.model.knows(req.0) {
            // Issued before the current Primary took over.
            return Ok(());
        }
        self.model.complete(req.0);
        if !p.durable {
            return Ok(());
        }
        self.model.acked_durable(req.0);
        // (a) durable on the primary; in protocol C also on every peer it
        // was replicated to throughout (same connection, still UpToDate).
        let mut who = vec![i];
        if self.protocol == Protocol::C {
            for (j, gen) in &p.qualifying {
                if self.link_gen(i, *j) == Some(*gen) && self.replicating(i, *j) {
                    who.push(*j);
                }
            }
        }
        for j in who {
            let disk = &self.nodes[j].disk;
            self.model
                .check_durable(req.0, &self.nodes[j].name, |b| tag_of(disk.durable(b), b))?;
            self.stats.durability_checks += 1;
        }
        Ok(())
    }

    fn fault(&mut self) {
        self.stats.faults += 1;
        if self.witness.is_some() && self.rng.chance(1, 4) {
            self.witness_fault();
            return;
        }
        let k = self.rng.range(0, self.links.len() as u64) as usize;
        let roll = self.rng.range(0, 100);
        let now = self.now;
        if roll < 30 {
            let d = self.rng.range(50 * MS, 1500 * MS);
            // A partition already longer (an isolated Primary) stays so.
            let until = now + Duration::from_nanos(d);
            let l = &mut self.links[k];
            l.partitioned_until = Some(l.partitioned_until.map_or(until, |t| t.max(until)));
            self.log(|| format!("fault: partition link {k} for {d} ns"));
        } else if roll < 55 {
            self.log(|| format!("fault: drop link {k}"));
            let (a, b) = (self.links[k].a, self.links[k].b);
            self.break_link(a, b);
        } else if roll < 75 && !self.dual {
            // One node down at a time: unflushed-write extents (R17) live
            // in the Primary's memory, so a Primary that crashes while a
            // crashed peer is away forgets what that peer lost (a known
            // gap, docs/replication.md).
            if self.nodes.iter().any(|n| n.r.is_none()) {
                return;
            }
            let live: Vec<usize> = (0..self.nodes.len())
                .filter(|i| self.nodes[*i].r.is_some())
                .collect();
            let resyncing: Vec<usize> = live
                .iter()
                .copied()
                .filter(|i| {
                    self.nodes[*i].r.as_ref().is_some_and(|r| {
                        (0..self.nodes[*i].cfg.peers.len()).any(|p| {
                            r.peer_status(PeerId(p as u8))
                                .is_some_and(|s| s.sync.is_some())
                        })
                    })
                })
                .collect();
            // With a witness, not the Primary while it holds the grant: if
            // it crashed before writing alone, both sides may come back
            // with the same generation and handshake before the other
            // learns from the witness that it is outdated; the tie-break
            // (R16) can then hold the holder Outdated — a deadlock only an
            // operator resolves (known gap, docs/replication.md).
            let holder = self
                .witness
                .as_ref()
                .and_then(|w| w.durable.get(VOLUME_KEY))
                .is_some_and(|v| v.holder.is_some());
            let primary_live = live.contains(&self.primary) && !holder;
            let resyncing: Vec<usize> = resyncing
                .into_iter()
                .filter(|i| (self.crash_primary && !holder) || *i != self.primary)
                .collect();
            // Crash a node in a resync (source or target) on half the
            // chances there is one, the Primary on 1 in 4, else another.
            let candidates: Vec<usize> = if !resyncing.is_empty() && self.rng.chance(1, 2) {
                resyncing
            } else if self.crash_primary && primary_live && self.rng.chance(1, 4) {
                vec![self.primary]
            } else {
                live.iter()
                    .copied()
                    .filter(|i| *i != self.primary)
                    .collect()
            };
            if candidates.is_empty() {
                return;
            }
            let i = candidates[self.rng.range(0, candidates.len() as u64) as usize];
            let down = self.rng.range(10 * MS, 500 * MS);
            self.log(|| format!("fault: crash n{i} for {down} ns"));
            self.crash_node(i, down);
        } else {
            let extra = self.rng.range(MS, 800 * MS);
            let d = self.rng.range(50 * MS, 1000 * MS);
            self.log(|| format!("fault: delay link {k} by {extra} ns for {d} ns"));
            self.links[k].extra_latency = extra;
            self.links[k].delay_until = Some(now + Duration::from_nanos(d));
        }
    }

    /// Cuts a replica from the witness, isolates the Primary from peers and
    /// witness at once, or crashes the witness.
    fn witness_fault(&mut self) {
        let now = self.now;
        let roll = self.rng.range(0, 100);
        let d = self.rng.range(50 * MS, 1500 * MS);
        let until = Some(now + Duration::from_nanos(d));
        if roll < 45 {
            let i = self.rng.range(0, self.nodes.len() as u64) as usize;
            self.stats.witness_cuts += 1;
            self.log(|| format!("fault: cut n{i} from the witness for {d} ns"));
            self.wlink_break(i);
            if let Some(w) = &mut self.witness {
                let l = &mut w.links[i];
                l.cut_until = l.cut_until.max(until);
            }
        } else if roll < 90 {
            // Long enough, mostly, for the peer timeout plus the failover
            // timeout: the other side takes over.
            let d = self.rng.range(600 * MS, 2000 * MS);
            let until = Some(now + Duration::from_nanos(d));
            let i = self.primary;
            self.stats.witness_cuts += 1;
            self.log(|| {
                format!("fault: isolate the Primary n{i} from peers and witness for {d} ns")
            });
            for k in 0..self.links.len() {
                if self.links[k].a == i || self.links[k].b == i {
                    let l = &mut self.links[k];
                    l.partitioned_until = l.partitioned_until.max(until);
                }
            }
            self.wlink_break(i);
            if let Some(w) = &mut self.witness {
                let l = &mut w.links[i];
                l.cut_until = l.cut_until.max(until);
            }
        } else {
            let down = self.rng.range(10 * MS, 500 * MS);
            self.stats.witness_crashes += 1;
            self.log(|| format!("fault: crash the witness for {down} ns"));
            for i in 0..self.nodes.len() {
                self.wlink_break(i);
            }
            if let Some(w) = &mut self.witness {
                w.arbiter = None;
                w.restart_at = Some(now + Duration::from_nanos(down));
            }
        }
    }

    fn content_equal(&self, i: usize, j: usize) -> bool {
        (0..BLOCKS).all(|b| self.nodes[i].disk.current(b) == self.nodes[j].disk.current(b))
    }

    fn check_quiescent(&mut self) -> Result<(), String> {
        for n in &self.nodes {
            for b in 0..BLOCKS {
                tag_of(n.disk.current(b), b).map_err(|e| format!("{}: {e}", n.name))?;
                tag_of(n.disk.durable(b), b).map_err(|e| format!("{} durable: {e}", n.name))?;
            }
        }
        let mut up = 0;
        if self.dual {
            // (d) for dual-primary: replicas that still replicate to each
            // other hold the same data, whatever the conflicts.
            if self.replicating(0, 1) || self.replicating(1, 0) {
                if let Some(b) = (0..BLOCKS)
                    .find(|b| self.nodes[0].disk.current(*b) != self.nodes[1].disk.current(*b))
                {
                    let t = |i: usize| tag_of(self.nodes[i].disk.current(b), b);
                    return Err(format!(
                        "dual-primary replicas diverged while replicating to each other: block {b} holds {:?} on {} and {:?} on {}",
                        t(0), self.nodes[0].name, t(1), self.nodes[1].name
                    ));
                }
                up += 1;
            }
            self.stats.up_to_date_at_end = up;
            return Ok(());
        }
        let p = self.primary;
        let disk = &self.nodes[p].disk;
        self.model
            .check_latest(&self.nodes[p].name, |b| tag_of(disk.current(b), b))?;
        for j in (0..self.nodes.len()).filter(|j| *j != p) {
            let st = self.nodes[p]
                .r
                .as_ref()
                .and_then(|r| r.peer_status(pid(p, j)))
                .ok_or("primary down")?;
            let r = self.nodes[j].r.as_ref().ok_or("secondary down")?;
            check::check_secondary(
                &self.nodes[j].name,
                st.repl == ReplState::Established,
                st.outdated,
                r.disk_state() == DiskState::UpToDate,
                self.content_equal(p, j),
            )
            .map_err(|e| {
                let b = (0..BLOCKS)
                    .find(|b| self.nodes[p].disk.current(*b) != self.nodes[j].disk.current(*b));
                match b {
                    Some(b) => format!(
                        "{e} (first at block {b}: primary holds {:?}, {} holds {:?})",
                        tag_of(self.nodes[p].disk.current(b), b),
                        self.nodes[j].name,
                        tag_of(self.nodes[j].disk.current(b), b)
                    ),
                    None => e,
                }
            })?;
            if st.repl == ReplState::Established {
                up += 1;
            }
            // (e) convergence: once healed, every secondary has been
            // resynced and replicates again.
            if st.repl != ReplState::Established || r.disk_state() != DiskState::UpToDate {
                return Err(format!(
                    "{} did not converge after healing: {:?}, own disk {:?}",
                    self.nodes[j].name,
                    st,
                    r.disk_state()
                ));
            }
        }
        self.stats.up_to_date_at_end = up;
        // (b): a Secondary cannot be promoted while the Primary is connected.
        let now = self.now;
        for j in (0..self.nodes.len()).filter(|j| *j != p) {
            if let Some(r) = &mut self.nodes[j].r {
                if r.promote(now).is_ok() {
                    return Err(format!(
                        "{} was promoted while the Primary is connected",
                        self.nodes[j].name
                    ));
                }
            }
        }
        Ok(())
    }
}

fn new_qc() -> QuorumCtl {
    QuorumCtl::new(
        VOLUME_KEY.to_owned(),
        true,
        true,
        FAILOVER_TIMEOUT,
        NoQuorum::Suspend,
    )
}

/// The metadata a restarted node reads back.
fn load_meta(meta: &BTreeMap<MetaAt, Bytes>, cfg: &Config) -> Result<LoadedMeta, String> {
    LoadedMeta::from_blocks(cfg.size, cfg.bitmap_chunk, cfg.initial_disk, |at| {
        meta.get(&at).map(|b| &b[..])
    })
}

/// Runs one seed with default options.
pub fn run(seed: u64) -> Result<Stats, Failure> {
    run_with(Options {
        seed,
        ..Options::default()
    })
}

/// Runs one seed.
pub fn run_with(opts: Options) -> Result<Stats, Failure> {
    let mut w = World::new(opts);
    match w.run() {
        Ok(()) => Ok(w.stats),
        Err(message) => Err(Failure {
            seed: w.opts.seed,
            message,
            trace: std::mem::take(&mut w.trace),
        }),
    }
}
