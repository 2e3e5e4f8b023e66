//! State-machine tests on a small in-memory cluster (like quinn-proto's
//! `Pair`): frames go through the real codec, disks are byte vectors, local
//! I/O and links can be held to observe intermediate states. Each test is
//! named after the rule of `docs/replication.md` it enforces.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::sync::View;
use super::*;

const SIZE: u64 = 64 * 1024;
const BS: u32 = 512;
const NAMES: [&str; 4] = ["a", "b", "c", "d"];

/// A local I/O the harness performs.
#[derive(Debug, Clone, PartialEq)]
enum NodeIo {
    Op(Op),
    Meta(MetaAt, Bytes),
    Read(u64, u64),
    /// Grow the disk (R29).
    Grow(u64),
}

impl PartialEq<Op> for NodeIo {
    fn eq(&self, other: &Op) -> bool {
        matches!(self, NodeIo::Op(o) if o == other)
    }
}

struct Node {
    r: Replica,
    disk: Vec<u8>,
    /// Metadata blocks written.
    meta: std::collections::BTreeMap<MetaAt, Bytes>,
    /// Local I/O not yet performed.
    io: VecDeque<(IoId, NodeIo)>,
    /// Hold data I/O (writes, reads); metadata writes still complete.
    hold_io: bool,
    /// Hold metadata writes.
    hold_meta: bool,
    fail_io: Option<i32>,
    done: Vec<(ReqId, Result<(), i32>)>,
    /// Frontend reads answered.
    reads: Vec<(ReqId, Result<Bytes, i32>)>,
    events: Vec<Event>,
    disconnects: Vec<(PeerId, String)>,
    /// Every local op performed, in order.
    log: Vec<Op>,
    /// Activity-log writes performed: (length of `log` then, extents).
    al_log: Vec<(usize, Vec<u64>)>,
}

struct Link {
    up: bool,
    /// Graceful close requested: deliver the queue, then break.
    closing: bool,
    hold: bool,
    q: VecDeque<BytesMut>,
}

struct Cluster {
    now: Time,
    nodes: Vec<Node>,
    /// links[from][to]
    links: Vec<Vec<Link>>,
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

fn w(offset: u64, byte: u8, blocks: usize, fua: bool) -> Op {
    Op::Write {
        offset,
        data: Bytes::from(vec![byte; blocks * BS as usize]),
        fua,
    }
}

impl Cluster {
    fn new(n: usize, tweak: impl Fn(usize, &mut Config)) -> Cluster {
        let nodes = (0..n)
            .map(|i| {
                let peers = (0..n)
                    .filter(|j| *j != i)
                    .map(|j| NAMES[j].to_owned())
                    .collect();
                let mut c = Config::new(NAMES[i], [7; 16], SIZE, BS, peers);
                if i == 0 {
                    c.initial_role = Role::Primary;
                }
                tweak(i, &mut c);
                Node {
                    r: Replica::new(c, Time::ZERO).unwrap(),
                    disk: vec![0; SIZE as usize],
                    meta: Default::default(),
                    io: VecDeque::new(),
                    hold_io: false,
                    hold_meta: false,
                    fail_io: None,
                    done: Vec::new(),
                    reads: Vec::new(),
                    events: Vec::new(),
                    disconnects: Vec::new(),
                    log: Vec::new(),
                    al_log: Vec::new(),
                }
            })
            .collect();
        let links = (0..n)
            .map(|_| {
                (0..n)
                    .map(|_| Link {
                        up: false,
                        closing: false,
                        hold: false,
                        q: VecDeque::new(),
                    })
                    .collect()
            })
            .collect();
        Cluster {
            now: Time::ZERO,
            nodes,
            links,
        }
    }

    /// A cluster with every pair connected and handshaken.
    fn connected(n: usize, tweak: impl Fn(usize, &mut Config)) -> Cluster {
        let mut c = Cluster::new(n, tweak);
        for i in 0..n {
            for j in i + 1..n {
                c.connect(i, j);
            }
        }
        c.run();
        c
    }

    fn connect(&mut self, i: usize, j: usize) {
        self.links[i][j] = Link {
            up: true,
            closing: false,
            hold: false,
            q: VecDeque::new(),
        };
        self.links[j][i] = Link {
            up: true,
            closing: false,
            hold: false,
            q: VecDeque::new(),
        };
        let now = self.now;
        self.nodes[i]
            .r
            .handle(now, Input::PeerConnected { peer: pid(i, j) });
        self.nodes[j]
            .r
            .handle(now, Input::PeerConnected { peer: pid(j, i) });
    }

    fn break_link(&mut self, i: usize, j: usize) {
        let now = self.now;
        for (a, b) in [(i, j), (j, i)] {
            if self.links[a][b].up {
                self.links[a][b].up = false;
                self.links[a][b].q.clear();
                self.nodes[a]
                    .r
                    .handle(now, Input::PeerDisconnected { peer: pid(a, b) });
            }
        }
    }

    fn submit(&mut self, i: usize, req: u64, op: Op) {
        let now = self.now;
        self.nodes[i].r.handle(
            now,
            Input::Frontend {
                req: ReqId(req),
                op,
            },
        );
    }

    fn drain(&mut self, i: usize) -> bool {
        let mut any = false;
        while let Some(o) = self.nodes[i].r.poll_output() {
            any = true;
            match o {
                Output::LocalIo { io, op } => self.nodes[i].io.push_back((io, NodeIo::Op(op))),
                Output::MetaWrite { io, at, data } => {
                    self.nodes[i].io.push_back((io, NodeIo::Meta(at, data)))
                }
                Output::Read { io, offset, len } => {
                    self.nodes[i].io.push_back((io, NodeIo::Read(offset, len)))
                }
                Output::Send { peer, frame } => {
                    let j = node_of(i, peer);
                    if self.links[i][j].up {
                        let mut b = BytesMut::new();
                        frame.encode(&mut b);
                        self.links[i][j].q.push_back(b);
                    }
                }
                Output::Complete { req, result } => self.nodes[i].done.push((req, result)),
                Output::ReadComplete { req, result } => self.nodes[i].reads.push((req, result)),
                Output::Disconnect { peer, reason } => {
                    self.nodes[i].disconnects.push((peer, reason));
                    let j = node_of(i, peer);
                    self.links[i][j].closing = true;
                }
                Output::Grow { size } => self.nodes[i].io.push_back((IoId(0), NodeIo::Grow(size))),
                Output::Event(e) => self.nodes[i].events.push(e),
            }
        }
        any
    }

    /// Performs the first I/O of node `i` that is not held.
    fn do_next_unheld(&mut self, i: usize) -> bool {
        let n = &mut self.nodes[i];
        let (hold_io, hold_meta) = (n.hold_io, n.hold_meta);
        let Some(k) = n.io.iter().position(|(_, x)| match x {
            NodeIo::Meta(..) => !hold_meta,
            _ => !hold_io,
        }) else {
            return false;
        };
        if let Some(e) = n.io.remove(k) {
            n.io.push_front(e);
        }
        self.do_io(i)
    }

    /// Performs the oldest I/O of node `i`, held or not.
    fn do_io(&mut self, i: usize) -> bool {
        let n = &mut self.nodes[i];
        let Some((io, nio)) = n.io.pop_front() else {
            return false;
        };
        let now = self.now;
        let op = match nio {
            NodeIo::Op(op) => op,
            NodeIo::Meta(at, data) => {
                if let MetaAt::ActivityLog(_) = at {
                    if let Ok(Some(al)) = crate::meta::ActivityLog::decode(&data) {
                        n.al_log.push((n.log.len(), al.extents));
                    }
                }
                n.meta.insert(at, data);
                n.r.handle(now, Input::LocalDone { io, result: Ok(()) });
                return true;
            }
            NodeIo::Grow(size) => {
                let result = match n.fail_io.take() {
                    Some(e) => Err(format!("errno {e}")),
                    None => {
                        n.disk.resize(size as usize, 0);
                        Ok(())
                    }
                };
                n.r.grown(now, size, result);
                return true;
            }
            NodeIo::Read(offset, len) => {
                let data =
                    Bytes::copy_from_slice(&n.disk[offset as usize..(offset + len) as usize]);
                n.r.handle(
                    now,
                    Input::ReadDone {
                        io,
                        result: Ok(data),
                    },
                );
                return true;
            }
        };
        let result = match n.fail_io.take() {
            Some(e) => Err(e),
            None => {
                match &op {
                    Op::Write { offset, data, .. } => n.disk
                        [*offset as usize..*offset as usize + data.len()]
                        .copy_from_slice(data),
                    Op::Trim { offset, len, .. } | Op::WriteZeroes { offset, len, .. } => {
                        n.disk[*offset as usize..(*offset + *len) as usize].fill(0)
                    }
                    Op::Flush => {}
                }
                n.log.push(op);
                Ok(())
            }
        };
        n.r.handle(now, Input::LocalDone { io, result });
        true
    }

    fn deliver(&mut self, i: usize, j: usize) -> bool {
        if !self.links[i][j].up || self.links[i][j].hold {
            return false;
        }
        let Some(mut b) = self.links[i][j].q.pop_front() else {
            return false;
        };
        let frame = Frame::decode(&mut b).unwrap().unwrap();
        assert!(b.is_empty());
        let now = self.now;
        self.nodes[j].r.handle(
            now,
            Input::PeerFrame {
                peer: pid(j, i),
                frame,
            },
        );
        true
    }

    /// Runs until nothing moves (held I/O and links stay held).
    /// Demotes node `i`, letting peers flush first (R20) as a driver
    /// retrying `PeersFlushing` would.
    fn demote(&mut self, i: usize) {
        for _ in 0..10 {
            match self.nodes[i].r.demote(self.now) {
                Ok(()) => return,
                Err(RoleError::PeersFlushing | RoleError::RequestsInFlight(_)) => self.run(),
                Err(e) => panic!("demote: {e}"),
            }
        }
        panic!("demote still refused after the peers flushed");
    }

    fn run(&mut self) {
        loop {
            let mut any = false;
            for i in 0..self.nodes.len() {
                any |= self.drain(i);
            }
            for i in 0..self.nodes.len() {
                while self.do_next_unheld(i) {
                    any = true;
                    self.drain(i);
                }
            }
            for i in 0..self.nodes.len() {
                for j in 0..self.nodes.len() {
                    while self.deliver(i, j) {
                        any = true;
                        self.drain(j);
                    }
                }
            }
            for i in 0..self.nodes.len() {
                for j in 0..self.nodes.len() {
                    let l = &self.links[i][j];
                    if l.up && l.closing && l.q.is_empty() {
                        self.break_link(i, j);
                        any = true;
                    }
                }
            }
            if !any {
                break;
            }
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now = self.now + d;
        for i in 0..self.nodes.len() {
            let now = self.now;
            if self.nodes[i].r.poll_timeout().is_some_and(|t| t <= now) {
                self.nodes[i].r.handle_timeout(now);
            }
        }
        self.run();
    }

    fn done(&self, i: usize, req: u64) -> Option<Result<(), i32>> {
        self.nodes[i]
            .done
            .iter()
            .find(|(r, _)| *r == ReqId(req))
            .map(|(_, res)| *res)
    }

    fn status(&self, i: usize, j: usize) -> PeerStatus {
        self.nodes[i].r.peer_status(pid(i, j)).unwrap()
    }
}

#[test]
fn handshake_connects_two_nodes_up_to_date() {
    let c = Cluster::connected(2, |_, _| {});
    let s = c.status(0, 1);
    assert_eq!(s.conn, ConnState::Connected);
    assert_eq!(s.repl, ReplState::Established);
    assert_eq!(s.role, Some(Role::Secondary));
    assert_eq!(c.status(1, 0).role, Some(Role::Primary));
    assert_eq!(c.nodes[1].r.disk_state(), DiskState::UpToDate);
}

#[test]
fn r1_protocol_c_completes_after_local_and_peer_ack() {
    let mut c = Cluster::connected(3, |_, _| {});
    // Local write held: both peers ack, no completion yet.
    c.nodes[0].hold_io = true;
    c.submit(0, 1, w(0, 1, 2, false));
    c.run();
    assert_eq!(c.done(0, 1), None);
    assert_eq!(&c.nodes[1].disk[..1024], &[1; 1024][..]);
    assert_eq!(&c.nodes[2].disk[..1024], &[1; 1024][..]);
    c.nodes[0].hold_io = false;
    c.run();
    assert_eq!(c.done(0, 1), Some(Ok(())));
    // Acks from one peer held: local done, still no completion.
    c.links[2][0].hold = true;
    c.submit(0, 2, w(4096, 2, 1, false));
    c.run();
    assert_eq!(&c.nodes[0].disk[4096..4608], &[2; 512][..]);
    assert_eq!(c.done(0, 2), None);
    c.links[2][0].hold = false;
    c.run();
    assert_eq!(c.done(0, 2), Some(Ok(())));
}

#[test]
fn r2_protocol_a_completes_after_local_and_send() {
    let mut c = Cluster::connected(2, |_, cfg| cfg.protocol = Protocol::A);
    c.links[1][0].hold = true; // no acks come back
    c.submit(0, 1, w(0, 1, 1, false));
    c.run();
    assert_eq!(c.done(0, 1), Some(Ok(())));
    assert_eq!(&c.nodes[1].disk[..512], &[1; 512][..]);
    // Still alive until the ack: demotion waits.
    assert_eq!(c.nodes[0].r.requests_in_flight(), 1);
    c.links[1][0].hold = false;
    c.run();
    assert_eq!(c.nodes[0].r.requests_in_flight(), 0);
}

#[test]
fn r3_flush_and_fua_are_durable_on_every_up_to_date_replica() {
    let mut c = Cluster::connected(2, |_, _| {});
    c.nodes[1].hold_io = true;
    c.submit(0, 1, Op::Flush);
    c.submit(0, 2, w(0, 3, 1, true));
    c.submit(
        0,
        3,
        Op::Trim {
            offset: 8192,
            len: 1024,
            fua: true,
        },
    );
    c.run();
    // The peer holds its I/O: nothing completes.
    assert_eq!(c.done(0, 1), None);
    assert_eq!(c.done(0, 2), None);
    assert_eq!(c.done(0, 3), None);
    assert!(c.nodes[1].io.iter().any(|(_, op)| *op == Op::Flush));
    assert!(c.nodes[1]
        .io
        .iter()
        .any(|(_, op)| matches!(op, NodeIo::Op(Op::Write { fua: true, .. }))));
    assert!(c.nodes[1]
        .io
        .iter()
        .any(|(_, op)| matches!(op, NodeIo::Op(Op::Trim { fua: true, .. }))));
    c.nodes[1].hold_io = false;
    c.run();
    assert_eq!(c.done(0, 1), Some(Ok(())));
    assert_eq!(c.done(0, 2), Some(Ok(())));
    assert_eq!(c.done(0, 3), Some(Ok(())));
    assert!(c.nodes[0].log.contains(&Op::Flush));
}

#[test]
fn r4_secondary_refuses_frontend_writes_and_acks_after_local_done() {
    let mut c = Cluster::connected(2, |_, _| {});
    c.submit(1, 9, w(0, 1, 1, false));
    c.submit(1, 10, Op::Flush);
    c.run();
    assert_eq!(c.done(1, 9), Some(Err(errno::EPERM)));
    assert_eq!(c.done(1, 10), Some(Err(errno::EPERM)));
    c.nodes[1].hold_io = true;
    c.submit(0, 1, w(0, 1, 1, false));
    c.run();
    assert_eq!(c.nodes[1].io.len(), 1);
    assert!(c.links[1][0].q.is_empty(), "no ack before the local write");
    c.nodes[1].hold_io = false;
    c.run();
    assert_eq!(c.done(0, 1), Some(Ok(())));
}

#[test]
fn r5_peer_flush_waits_for_earlier_peer_writes() {
    let mut c = Cluster::connected(2, |_, cfg| cfg.protocol = Protocol::A);
    c.nodes[1].hold_io = true;
    c.submit(0, 1, w(0, 1, 1, false));
    c.run();
    c.submit(0, 2, Op::Flush);
    c.run();
    // Flush not submitted on the secondary while the write is pending.
    assert_eq!(c.nodes[1].io.len(), 1);
    c.nodes[1].hold_io = false;
    c.run();
    assert!(matches!(c.nodes[1].log[0], Op::Write { .. }));
    assert_eq!(c.nodes[1].log[1], Op::Flush);
}

#[test]
fn r6_peer_loss_completes_writes_and_resyncs_only_what_changed() {
    let mut c = Cluster::connected(2, |_, _| {});
    let chunk = u64::from(c.nodes[0].r.config().bitmap_chunk);
    c.links[0][1].hold = true;
    c.submit(0, 1, w(0, 1, 1, false));
    c.run();
    assert_eq!(c.done(0, 1), None);
    c.break_link(0, 1);
    c.run();
    assert_eq!(c.done(0, 1), Some(Ok(())));
    let s = c.status(0, 1);
    assert!(s.outdated);
    assert_eq!(s.conn, ConnState::StandAlone);
    assert_eq!(
        s.out_of_sync_bytes, chunk,
        "the unacknowledged write's chunk"
    );
    assert!(c.nodes[0].events.contains(&Event::PeerOutdated {
        peer: pid(0, 1),
        reason: OutdatedReason::ConnectionLost
    }));
    assert_ne!(
        c.nodes[0].r.current_generation(),
        c.nodes[1].r.current_generation()
    );
    // The primary keeps serving; each write is marked for the peer.
    c.submit(0, 2, w(8 * chunk, 2, 1, false));
    c.run();
    assert_eq!(c.done(0, 2), Some(Ok(())));
    assert_eq!(c.status(0, 1).out_of_sync_bytes, 2 * chunk);
    // Reconnect with the resync held on the target: it is Inconsistent
    // and cannot be promoted meanwhile.
    c.nodes[1].hold_io = true;
    c.connect(0, 1);
    c.run();
    assert_eq!(c.status(0, 1).repl, ReplState::SyncSource);
    assert_eq!(c.status(1, 0).repl, ReplState::SyncTarget);
    assert_eq!(c.nodes[1].r.disk_state(), DiskState::Inconsistent);
    assert_eq!(
        c.nodes[1].r.promote(c.now),
        Err(RoleError::DiskNotUpToDate(DiskState::Inconsistent))
    );
    // R20: the Primary stays one until the peer flushed what it
    // acknowledged (its I/O is held here).
    assert_eq!(c.nodes[0].r.demote(c.now), Err(RoleError::PeersFlushing));
    c.nodes[1].hold_io = false;
    c.run();
    // Only the two dirty chunks moved; the replicas are identical and in
    // one generation.
    assert_eq!(c.nodes[1].r.disk_state(), DiskState::UpToDate);
    assert_eq!(c.status(0, 1).repl, ReplState::Established);
    assert!(!c.status(0, 1).outdated);
    assert_eq!(c.status(0, 1).out_of_sync_bytes, 0);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    assert_eq!(
        c.nodes[0].r.current_generation(),
        c.nodes[1].r.current_generation()
    );
    assert!(c.nodes[0].events.contains(&Event::SyncFinished {
        peer: pid(0, 1),
        role: SyncRole::Source,
        bytes: 2 * chunk
    }));
    // Replication continues.
    c.submit(0, 3, w(1024, 3, 1, false));
    c.run();
    assert_eq!(c.done(0, 3), Some(Ok(())));
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
}

#[test]
fn r6_peer_timeout_and_keepalive() {
    let mut c = Cluster::connected(2, |_, _| {});
    // Idle: pings keep the connection alive.
    for _ in 0..20 {
        c.advance(Duration::from_millis(500));
    }
    assert_eq!(c.status(0, 1).conn, ConnState::Connected);
    // Silence: a held link times out after peer_timeout.
    c.links[1][0].hold = true;
    c.links[0][1].hold = true;
    c.submit(0, 1, w(0, 1, 1, false));
    c.run();
    c.advance(Duration::from_secs(4));
    assert_eq!(c.done(0, 1), None);
    c.advance(Duration::from_millis(1100));
    assert!(c.nodes[0]
        .events
        .contains(&Event::PeerTimeout { peer: pid(0, 1) }));
    assert_eq!(c.done(0, 1), Some(Ok(())));
    assert!(c.status(0, 1).outdated);
    assert_eq!(c.nodes[0].disconnects.len(), 1);
}

#[test]
fn status_counts_unacked_requests_and_out_of_sync_bytes() {
    let mut c = Cluster::connected(2, |_, _| {});
    let chunk = u64::from(c.nodes[0].r.config().bitmap_chunk);
    let s = c.status(0, 1);
    assert_eq!((s.in_flight, s.out_of_sync_bytes), (0, 0));
    // Acks held: a 2-block write, a 3-block trim, a 1-block write-zeroes
    // and a flush are sent and not acknowledged.
    c.links[1][0].hold = true;
    c.submit(0, 1, w(0, 1, 2, false));
    c.submit(
        0,
        2,
        Op::Trim {
            offset: 4096,
            len: 3 * u64::from(BS),
            fua: false,
        },
    );
    c.submit(
        0,
        3,
        Op::WriteZeroes {
            offset: 8192,
            len: u64::from(BS),
            no_hole: false,
            fua: false,
        },
    );
    c.submit(0, 4, Op::Flush);
    c.run();
    let s = c.status(0, 1);
    assert_eq!(s.in_flight, 4);
    assert_eq!(s.out_of_sync_bytes, 6 * u64::from(BS));
    // The secondary sends nothing of its own.
    let back = c.status(1, 0);
    assert_eq!((back.in_flight, back.out_of_sync_bytes), (0, 0));
    // Acked: back in sync.
    c.links[1][0].hold = false;
    c.run();
    let s = c.status(0, 1);
    assert_eq!((s.in_flight, s.out_of_sync_bytes), (0, 0));
    // Lost with a write unacknowledged: outdated by that write's chunk,
    // nothing waiting for it.
    c.links[0][1].hold = true;
    c.submit(0, 5, w(0, 5, 1, false));
    c.run();
    assert_eq!(c.status(0, 1).in_flight, 1);
    c.break_link(0, 1);
    c.run();
    let s = c.status(0, 1);
    assert!(s.outdated);
    assert_eq!((s.in_flight, s.out_of_sync_bytes), (0, chunk));
    // A write to another chunk adds it; after reconnecting the resync
    // clears both.
    c.submit(0, 6, w(4 * chunk, 6, 1, false));
    c.run();
    assert_eq!(c.status(0, 1).out_of_sync_bytes, 2 * chunk);
    c.connect(0, 1);
    c.run();
    let s = c.status(0, 1);
    assert_eq!(s.conn, ConnState::Connected);
    assert_eq!((s.in_flight, s.out_of_sync_bytes, s.sync), (0, 0, None));
}

#[test]
fn status_reports_missed_writes_as_their_dirty_chunks() {
    let mut c = Cluster::new(2, |_, _| {});
    let chunk = u64::from(c.nodes[0].r.config().bitmap_chunk);
    // Never connected, nothing written: a new volume is zero everywhere.
    assert_eq!(c.status(0, 1).out_of_sync_bytes, 0);
    c.submit(0, 1, w(0, 1, 1, false));
    c.submit(0, 2, w(512, 1, 1, false));
    c.run();
    assert_eq!(c.done(0, 1), Some(Ok(())));
    let s = c.status(0, 1);
    assert!(s.outdated);
    assert_eq!((s.in_flight, s.out_of_sync_bytes), (0, chunk));
}

/// The first data byte of every write node `n` performed, in order (the
/// tests write each request with a distinct byte).
fn data_writes(n: &Node) -> Vec<u8> {
    n.log
        .iter()
        .filter_map(|o| match o {
            Op::Write { data, .. } => Some(data[0]),
            _ => None,
        })
        .collect()
}

#[test]
fn r7_overlapping_writes_wait_for_earlier_ones() {
    let mut c = Cluster::connected(2, |_, _| {});
    c.links[1][0].hold = true; // first write stays in flight (no ack)
    c.submit(0, 1, w(0, 1, 2, false)); // blocks 0-1
    c.submit(0, 2, w(512, 2, 2, false)); // blocks 1-2: overlaps
    c.submit(0, 3, w(4096, 3, 1, false)); // disjoint
    c.run();
    // Overlapping write submitted neither locally nor to the peer.
    assert_eq!(data_writes(&c.nodes[0]), vec![1, 3]);
    assert_eq!(data_writes(&c.nodes[1]), vec![1, 3]);
    c.links[1][0].hold = false;
    c.run();
    assert_eq!(data_writes(&c.nodes[0]), vec![1, 3, 2]);
    assert_eq!(data_writes(&c.nodes[1]), vec![1, 3, 2]);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    for r in 1..=3 {
        assert_eq!(c.done(0, r), Some(Ok(())));
    }
}

/// Inputs handed over in one batch (`begin_batch` .. `end_batch`, as
/// tandemd's driver does with everything queued) end as they would one by
/// one: overlapping writes keep their issue order on both replicas, every
/// request completes once and successfully, and both disks are identical.
#[test]
fn batched_inputs_end_as_they_would_one_by_one() {
    let mut c = Cluster::connected(2, |_, _| {});
    c.nodes[0].r.begin_batch();
    c.submit(0, 1, w(0, 1, 2, false)); // blocks 0-1
    c.submit(0, 2, w(512, 2, 2, false)); // blocks 1-2: overlaps the first
    c.submit(0, 3, w(4096, 3, 1, true)); // disjoint, FUA
    c.submit(0, 4, Op::Flush);
    assert!(
        c.nodes[0].r.poll_output().is_none(),
        "a batch does nothing before it ends"
    );
    c.nodes[0].r.end_batch();
    // Each node takes its completions and frames in one batch per round.
    for _ in 0..100 {
        let mut any = false;
        for i in 0..2 {
            any |= c.drain(i);
        }
        for i in 0..2 {
            c.nodes[i].r.begin_batch();
            while c.do_next_unheld(i) {
                any = true;
            }
            for j in 0..2 {
                while c.deliver(j, i) {
                    any = true;
                }
            }
            c.nodes[i].r.end_batch();
        }
        if !any {
            break;
        }
    }
    assert_eq!(data_writes(&c.nodes[0]), vec![1, 3, 2]);
    assert_eq!(data_writes(&c.nodes[1]), vec![1, 3, 2]);
    assert_eq!(c.nodes[0].disk[512], 2, "the later overlapping write wins");
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    for r in 1..=4 {
        assert_eq!(c.done(0, r), Some(Ok(())), "request {r}");
    }
    assert_eq!(c.nodes[0].done.len(), 4, "each request completes once");
    assert_eq!(c.status(0, 1).out_of_sync_bytes, 0);
}

#[test]
fn r8_missed_writes_are_marked_durably_first_and_resynced() {
    let mut c = Cluster::new(3, |_, _| {});
    c.connect(0, 1);
    c.run();
    // c (node 2) never connected: a write misses it. Its bitmap bit and the
    // new generation are durable before the write is submitted.
    c.nodes[0].hold_meta = true;
    c.submit(0, 1, w(0, 1, 1, false));
    c.run();
    let first = c.nodes[0].io.front().map(|(_, x)| x.clone());
    assert!(
        matches!(first, Some(NodeIo::Meta(..))),
        "metadata first: {first:?}"
    );
    assert!(
        c.nodes[1].log.is_empty(),
        "not sent before the bitmap is durable"
    );
    c.nodes[0].hold_meta = false;
    c.run();
    assert_eq!(c.done(0, 1), Some(Ok(())));
    assert!(c.status(0, 2).outdated);
    assert!(!c.status(0, 1).outdated);
    assert!(c.nodes[0].events.contains(&Event::PeerOutdated {
        peer: pid(0, 2),
        reason: OutdatedReason::MissedWrite
    }));
    // b stays in the primary's generation.
    assert_eq!(
        c.nodes[0].r.current_generation(),
        c.nodes[1].r.current_generation()
    );
    c.connect(0, 2);
    c.connect(1, 2);
    c.run();
    assert_eq!(c.nodes[2].r.disk_state(), DiskState::UpToDate);
    assert_eq!(c.nodes[0].disk, c.nodes[2].disk);
    c.submit(0, 2, w(0, 2, 1, false));
    c.run();
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    assert_eq!(c.nodes[0].disk, c.nodes[2].disk);
}

#[test]
fn r9_dual_primary_conflicts_are_detected_and_ordered_the_same_everywhere() {
    for (first, second) in [(0usize, 1usize), (1, 0)] {
        let mut c = Cluster::connected(2, |_, cfg| {
            cfg.allow_two_primaries = true;
            cfg.initial_role = Role::Primary;
        });
        assert_eq!(c.status(0, 1).role, Some(Role::Primary));
        // Both write overlapping blocks before seeing the other's write.
        c.links[0][1].hold = true;
        c.links[1][0].hold = true;
        c.submit(first, 1, w(0, 0xA, 2, false));
        c.submit(second, 1, w(512, 0xB, 2, false));
        c.run();
        c.links[0][1].hold = false;
        c.links[1][0].hold = false;
        c.run();
        assert_eq!(c.done(0, 1), Some(Ok(())));
        assert_eq!(c.done(1, 1), Some(Ok(())));
        for n in &c.nodes {
            assert!(n
                .events
                .iter()
                .any(|e| matches!(e, Event::ConcurrentWriteConflict { .. })));
        }
        assert_eq!(c.nodes[0].disk, c.nodes[1].disk, "replicas diverged");
        for n in &c.nodes {
            assert_eq!(n.r.concurrent_write_conflicts(), 1, "conflict counter");
        }
        // Lower node name ("a", node 0) wins the overlap.
        let a_byte = if first == 0 { 0xA } else { 0xB };
        assert_eq!(c.nodes[0].disk[512], a_byte);
        assert!(c.status(0, 1).repl == ReplState::Established);
    }
}

#[test]
fn r10_handshake_refuses_mismatches() {
    type Tweak = Box<dyn Fn(&mut Config)>;
    let cases: Vec<(Tweak, &str)> = vec![
        (Box::new(|c| c.volume_uuid = [8; 16]), "uuid"),
        (Box::new(|c| c.size = SIZE * 2), "size"),
        (Box::new(|c| c.block_size = 4096), "block size"),
        (Box::new(|c| c.protocol_version += 1), "protocol version"),
        (Box::new(|c| c.bitmap_chunk = 8192), "bitmap chunk"),
        (Box::new(|c| c.initial_role = Role::Primary), "Primary"),
        (Box::new(|c| c.node_name = "x".into()), "node name"),
    ];
    for (tweak, word) in cases {
        let mut c = Cluster::connected(2, |i, cfg| {
            if i == 1 {
                tweak(cfg)
            }
        });
        c.run();
        for i in 0..2 {
            assert_eq!(c.status(i, 1 - i).conn, ConnState::StandAlone, "{word}");
            assert_eq!(c.nodes[i].disk, vec![0; SIZE as usize], "{word}");
            assert!(
                c.nodes[i].events.iter().any(
                    |e| matches!(e, Event::HandshakeRefused { reason, .. } if reason.contains(word))
                ),
                "{word}: {:?}",
                c.nodes[i].events
            );
            assert!(!c.nodes[i].disconnects.is_empty());
        }
    }
}

#[test]
fn r11_role_changes() {
    let mut c = Cluster::connected(2, |_, _| {});
    assert!(matches!(
        c.nodes[1].r.promote(c.now),
        Err(RoleError::PeerIsPrimary(_))
    ));
    c.nodes[0].hold_io = true;
    c.submit(0, 1, w(0, 1, 1, false));
    c.run();
    assert_eq!(
        c.nodes[0].r.demote(c.now),
        Err(RoleError::RequestsInFlight(1))
    );
    c.nodes[0].hold_io = false;
    c.run();
    c.demote(0);
    c.run();
    c.nodes[1].r.promote(c.now).unwrap();
    c.run();
    assert_eq!(c.status(0, 1).role, Some(Role::Primary));
    assert!(matches!(
        c.nodes[0].r.promote(c.now),
        Err(RoleError::PeerIsPrimary(_))
    ));
    // Switchover kept both replicas in sync.
    c.submit(1, 2, w(512, 2, 1, false));
    c.run();
    assert_eq!(c.done(1, 2), Some(Ok(())));
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);

    // Dual-primary: two allowed, a third refused.
    let mut c = Cluster::connected(3, |_, cfg| cfg.allow_two_primaries = true);
    c.nodes[1].r.promote(c.now).unwrap();
    c.run();
    assert_eq!(
        c.nodes[2].r.promote(c.now),
        Err(RoleError::TooManyPrimaries)
    );
}

#[test]
fn r11_simultaneous_promotion_outside_dual_primary_is_refused() {
    let mut c = Cluster::connected(2, |_, _| {});
    c.demote(0);
    c.run();
    // Both promote before seeing the other's state update.
    c.links[0][1].hold = true;
    c.links[1][0].hold = true;
    c.nodes[0].r.promote(c.now).unwrap();
    c.nodes[1].r.promote(c.now).unwrap();
    c.run();
    c.links[0][1].hold = false;
    c.links[1][0].hold = false;
    c.run();
    for i in 0..2 {
        assert!(c.nodes[i]
            .events
            .iter()
            .any(|e| matches!(e, Event::SplitRoleRefused { .. })));
        assert_eq!(c.status(i, 1 - i).conn, ConnState::StandAlone);
    }
}

#[test]
fn r12_io_errors() {
    let mut c = Cluster::connected(2, |_, _| {});
    // Peer error: completes OK (data safe locally), peer outdated; the
    // secondary detached its disk (R23).
    c.nodes[1].fail_io = Some(errno::EIO);
    c.submit(0, 2, w(512, 2, 1, false));
    c.run();
    assert_eq!(c.done(0, 2), Some(Ok(())));
    assert!(c.nodes[0].events.contains(&Event::PeerOutdated {
        peer: pid(0, 1),
        reason: OutdatedReason::PeerIoError
    }));
    assert_eq!(c.nodes[1].r.disk_state(), DiskState::Diskless);
    assert_eq!(c.status(0, 1).repl, ReplState::Off);
    // Local error on the primary with no UpToDate peer: the frontend sees it.
    c.nodes[0].fail_io = Some(errno::EIO);
    c.submit(0, 1, w(0, 1, 1, false));
    c.run();
    assert_eq!(c.done(0, 1), Some(Err(errno::EIO)));
}

#[test]
fn r13_trim_and_write_zeroes_are_sent_as_commands() {
    let mut c = Cluster::connected(2, |_, _| {});
    c.submit(0, 1, w(0, 9, 8, false));
    c.run();
    c.links[0][1].hold = true;
    c.submit(
        0,
        2,
        Op::WriteZeroes {
            offset: 0,
            len: 2048,
            no_hole: true,
            fua: false,
        },
    );
    c.submit(
        0,
        3,
        Op::Trim {
            offset: 2048,
            len: 2048,
            fua: false,
        },
    );
    c.run();
    let sizes: Vec<usize> = c.links[0][1].q.iter().map(|b| b.len()).collect();
    assert_eq!(sizes, vec![frame::HEADER_LEN + 16; 2]);
    c.links[0][1].hold = false;
    c.run();
    assert_eq!(c.nodes[1].disk, c.nodes[0].disk);
    assert!(c.nodes[1].disk[..4096].iter().all(|b| *b == 0));
}

#[test]
fn frontend_requests_are_validated() {
    let mut c = Cluster::connected(2, |_, _| {});
    c.submit(0, 1, w(1, 1, 1, false));
    c.submit(0, 2, w(SIZE, 1, 1, false));
    c.submit(
        0,
        3,
        Op::Trim {
            offset: 0,
            len: 0,
            fua: false,
        },
    );
    c.submit(
        0,
        4,
        Op::Trim {
            offset: u64::MAX - 511,
            len: 512,
            fua: false,
        },
    );
    c.run();
    assert_eq!(c.done(0, 1), Some(Err(errno::EINVAL)));
    assert_eq!(c.done(0, 2), Some(Err(errno::ENOSPC)));
    assert_eq!(c.done(0, 3), Some(Err(errno::EINVAL)));
    assert_eq!(c.done(0, 4), Some(Err(errno::ENOSPC)));
    assert!(c.nodes[1].log.is_empty());
}

#[test]
fn stray_inputs_do_not_panic() {
    let mut c = Cluster::connected(2, |_, _| {});
    let now = c.now;
    let r = &mut c.nodes[0].r;
    r.handle(
        now,
        Input::LocalDone {
            io: IoId(999),
            result: Ok(()),
        },
    );
    r.handle(now, Input::PeerConnected { peer: PeerId(9) });
    r.handle(now, Input::PeerDisconnected { peer: PeerId(9) });
    r.handle(
        now,
        Input::PeerFrame {
            peer: PeerId(9),
            frame: Frame::Flush { id: 1 },
        },
    );
    // Data from a Secondary and unknown acks are protocol violations.
    c.nodes[0].r.handle(
        now,
        Input::PeerFrame {
            peer: pid(0, 1),
            frame: Frame::Ack { id: 77, status: 0 },
        },
    );
    c.run();
    assert_eq!(c.status(0, 1).conn, ConnState::StandAlone);
    assert!(c.nodes[0]
        .events
        .iter()
        .any(|e| matches!(e, Event::ProtocolViolation { .. })));
}

/// Found by the simulator: the peer's ack for our conflicting write arrives
/// right behind its own write; our write must still be re-applied after the
/// peer's before it completes, or the replicas diverge.
#[test]
fn r9_ack_racing_a_conflicting_write_does_not_skip_the_reapply() {
    let mut c = Cluster::connected(2, |_, cfg| {
        cfg.allow_two_primaries = true;
        cfg.initial_role = Role::Primary;
    });
    c.links[0][1].hold = true;
    c.links[1][0].hold = true;
    c.nodes[0].hold_io = true;
    c.submit(0, 1, w(0, 0xA, 2, false)); // "a" (lower name): blocks 0-1
    c.submit(1, 1, w(512, 0xB, 1, false)); // "b": block 1
    c.run();
    // b sees a's write while its own is unacked, applies it and acks it:
    // b -> a now carries b's write followed by the ack of a's write.
    c.links[0][1].hold = false;
    c.run();
    c.links[1][0].hold = false;
    c.run();
    assert_eq!(c.done(0, 1), None, "a's write must wait for its re-apply");
    c.nodes[0].hold_io = false;
    c.run();
    assert_eq!(c.done(0, 1), Some(Ok(())));
    assert_eq!(c.done(1, 1), Some(Ok(())));
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk, "replicas diverged");
    assert_eq!(c.nodes[0].disk[512], 0xA, "the lower name wins");
}

/// The metadata a node would read back after a crash.
fn load_meta(n: &Node, cfg: &Config) -> LoadedMeta {
    LoadedMeta::from_blocks(cfg.size, cfg.bitmap_chunk, cfg.initial_disk, |at| {
        n.meta.get(&at).map(|b| &b[..])
    })
    .unwrap()
}

impl Cluster {
    /// Crashes node `i` (its links break, pending I/O is lost) and starts it
    /// again from the metadata it wrote, as Secondary, with a new instance.
    fn restart(&mut self, i: usize) {
        for j in 0..self.nodes.len() {
            if j != i {
                self.break_link(i, j);
            }
        }
        self.run();
        let mut cfg = self.nodes[i].r.config().clone();
        cfg.gen_seed += 1;
        cfg.initial_role = Role::Secondary;
        let loaded = load_meta(&self.nodes[i], &cfg);
        let n = &mut self.nodes[i];
        n.io.clear();
        n.r = Replica::with_meta(cfg, loaded, self.now).unwrap();
    }
}

#[test]
fn generations_decide_the_same_direction_on_both_sides() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config as PtConfig, TestRunner};
    let gen = || prop_oneof![Just(0u64), Just(1u64), Just(2u64), Just(3u64), Just(4u64)];
    let gens = || {
        (
            (gen(), gen(), gen(), gen(), 0u64..3, gen()),
            (any::<bool>(), 0u8..4, 0u64..3),
        )
            .prop_map(
                |((c, b, h0, h1, d, alt), (discard, pol, since))| HelloGens {
                    current: c.max(1),
                    bitmap_gen: b,
                    bitmap_alt: alt,
                    history: [h0, h1, 0, 0, 0, 0, 0, 0],
                    dirty_bits: d,
                    chunk: 4096,
                    instance: 0,
                    discard_my_data: discard,
                    split_brain_policy: SplitBrainPolicy::from_code(pol).unwrap_or_default(),
                    primary_since: since,
                },
            )
    };
    let role = || prop_oneof![Just(Role::Primary), Just(Role::Secondary)];
    let disk = || {
        prop_oneof![
            Just(DiskState::UpToDate),
            Just(DiskState::Outdated),
            Just(DiskState::Inconsistent)
        ]
    };
    let mut runner = TestRunner::new(PtConfig::with_cases(4000));
    runner
        .run(
            &(gens(), role(), disk(), gens(), role(), disk()),
            |(ga, ra, da, gb, rb, db)| {
                let a = View {
                    gens: ga,
                    role: ra,
                    disk: da,
                    name: "a",
                };
                let b = View {
                    gens: gb,
                    role: rb,
                    disk: db,
                    name: "b",
                };
                let (x, y) = (decide(&a, &b), decide(&b, &a));
                prop_assert_eq!(x, y.mirror());
                // Never a source that is not UpToDate, never a Primary target.
                if let Decision::Source { .. } = x {
                    prop_assert_eq!(da, DiskState::UpToDate);
                    prop_assert_eq!(rb, Role::Secondary);
                }
                Ok(())
            },
        )
        .unwrap();
    // The table of docs/replication.md, row by row.
    let v = |current, bitmap_gen, history: [u64; 2], dirty_bits| HelloGens {
        current,
        bitmap_gen,
        bitmap_alt: 0,
        history: [history[0], history[1], 0, 0, 0, 0, 0, 0],
        dirty_bits,
        chunk: 4096,
        instance: 0,
        ..HelloGens::default()
    };
    let view = |gens, role, name| View {
        gens,
        role,
        disk: DiskState::UpToDate,
        name,
    };
    let (p, s) = (Role::Primary, Role::Secondary);
    let cases = [
        (v(5, 0, [0; 2], 0), v(5, 0, [0; 2], 0), Decision::InSync),
        (
            v(5, 0, [0; 2], 3),
            v(5, 0, [0; 2], 0),
            Decision::Source { full: false },
        ),
        (
            v(6, 5, [5, 0], 3),
            v(5, 0, [0; 2], 0),
            Decision::Source { full: false },
        ),
        (v(6, 5, [5, 0], 3), v(7, 5, [5, 0], 1), Decision::SplitBrain),
        (
            v(8, 0, [6, 5], 0),
            v(5, 0, [0; 2], 0),
            Decision::Source { full: true },
        ),
        (v(8, 0, [6, 0], 0), v(9, 0, [7, 0], 0), Decision::Unrelated),
    ];
    for (a, b, want) in cases {
        assert_eq!(
            decide(&view(a, p, "a"), &view(b, s, "b")),
            want,
            "{a:?} {b:?}"
        );
    }
    // Two Secondaries, same generation, bits: the lower name is source,
    // unless exactly one side volunteers to discard its data (a node the
    // witness holds outdated), which then waits to be the target.
    let (a, mut b) = (v(5, 0, [0; 2], 3), v(5, 0, [0; 2], 1));
    assert_eq!(
        decide(&view(a, s, "a"), &view(b, s, "b")),
        Decision::SourceWaits
    );
    let mut a2 = a;
    a2.discard_my_data = true;
    assert_eq!(
        decide(&view(a2, s, "a"), &view(b, s, "b")),
        Decision::TargetWaits
    );
    b.discard_my_data = true;
    assert_eq!(
        decide(&view(a2, s, "a"), &view(b, s, "b")),
        Decision::SourceWaits
    );
    // R24: resolving a split brain (a Primary with 3 changed chunks, a
    // Secondary with 1, both diverged from generation 5).
    let sb = |discard, policy, since: u64| {
        let mut a = v(6, 5, [5, 0], 3);
        let mut b = v(7, 5, [5, 0], 1);
        a.split_brain_policy = policy;
        b.split_brain_policy = policy;
        b.discard_my_data = discard;
        a.primary_since = 100;
        b.primary_since = since;
        decide(&view(a, p, "a"), &view(b, s, "b"))
    };
    use SplitBrainPolicy as P;
    let bitmap = Decision::Source { full: false };
    assert_eq!(sb(true, P::Disconnect, 0), bitmap);
    assert_eq!(sb(false, P::Disconnect, 0), Decision::SplitBrain);
    assert_eq!(sb(false, P::DiscardLeastChanges, 0), bitmap);
    assert_eq!(sb(false, P::DiscardZeroChanges, 0), Decision::SplitBrain);
    assert_eq!(sb(false, P::DiscardYoungerPrimary, 0), Decision::SplitBrain);
    assert_eq!(sb(false, P::DiscardYoungerPrimary, 200), bitmap);
    // The younger Primary is a: it would be the target, but it is Primary.
    assert_eq!(
        sb(false, P::DiscardYoungerPrimary, 50),
        Decision::TargetIsPrimary
    );
    // Different policies on the two sides: no automatic resolution.
    let (mut a, mut b) = (v(6, 5, [5, 0], 3), v(7, 5, [5, 0], 0));
    a.split_brain_policy = P::DiscardZeroChanges;
    assert_eq!(
        decide(&view(a, p, "a"), &view(b, s, "b")),
        Decision::SplitBrain
    );
    b.split_brain_policy = P::DiscardZeroChanges;
    assert_eq!(decide(&view(a, p, "a"), &view(b, s, "b")), bitmap);
    // Bitmaps from different bases: the resolution is a full sync.
    let (a, mut b) = (v(6, 5, [5, 0], 3), v(7, 4, [4, 5], 1));
    b.discard_my_data = true;
    assert_eq!(
        decide(&view(a, p, "a"), &view(b, s, "b")),
        Decision::Source { full: true }
    );
}

#[test]
fn split_brain_is_detected_on_both_sides_and_nothing_is_overwritten() {
    let mut c = Cluster::connected(2, |_, _| {});
    c.break_link(0, 1);
    c.run();
    // Both write while apart: a keeps writing, b is promoted and writes.
    c.submit(0, 1, w(0, 0xA, 1, false));
    c.nodes[1].r.promote(c.now).unwrap();
    c.submit(1, 1, w(4096, 0xB, 1, false));
    c.run();
    c.demote(1);
    let before = (c.nodes[0].disk.clone(), c.nodes[1].disk.clone());
    c.connect(0, 1);
    c.run();
    for i in 0..2 {
        let st = c.status(i, 1 - i);
        assert_eq!(st.conn, ConnState::StandAlone);
        assert!(st.split_brain);
        assert!(c.nodes[i]
            .events
            .iter()
            .any(|e| matches!(e, Event::SplitBrain { .. })));
        assert!(c.nodes[i].events.iter().any(
            |e| matches!(e, Event::HandshakeRefused { reason, .. } if reason.contains("split brain"))
        ));
    }
    assert_eq!((c.nodes[0].disk.clone(), c.nodes[1].disk.clone()), before);
}

#[test]
fn r24_discard_my_data_resolves_a_split_brain_with_a_bitmap_resync() {
    let mut c = Cluster::connected(2, |_, _| {});
    c.submit(0, 1, w(0, 0x1, 1, false));
    c.run();
    c.break_link(0, 1);
    c.run();
    // Both write while apart, to different and to the same blocks.
    c.submit(0, 2, w(0, 0xA, 1, false));
    c.submit(0, 3, w(8192, 0xA, 1, false));
    c.nodes[1].r.promote(c.now).unwrap();
    c.submit(1, 1, w(4096, 0xB, 1, false));
    c.submit(1, 2, w(8192, 0xB, 1, false));
    c.run();
    c.demote(1);
    c.connect(0, 1);
    c.run();
    assert!(c.status(0, 1).split_brain);
    // A Primary may not volunteer; the Secondary does.
    assert_eq!(
        c.nodes[0].r.set_discard_my_data(true),
        Err(RoleError::DiscardOnPrimary)
    );
    c.nodes[1].r.set_discard_my_data(true).unwrap();
    c.connect(0, 1);
    c.run();
    for i in 0..2 {
        let st = c.status(i, 1 - i);
        assert_eq!(st.conn, ConnState::Connected, "node {i}");
        assert_eq!(st.repl, ReplState::Established, "node {i}");
        assert!(!st.split_brain);
    }
    assert_eq!(c.nodes[1].r.disk_state(), DiskState::UpToDate);
    assert!(!c.nodes[1].r.discard_my_data(), "cleared once resynced");
    // b's blocks are a's again, including the one only b wrote: the
    // union of both bitmaps moved, three 4 KiB chunks, not the volume.
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    let moved: u64 = c.nodes[0]
        .events
        .iter()
        .filter_map(|e| match e {
            Event::SyncFinished {
                role: SyncRole::Source,
                bytes,
                ..
            } => Some(*bytes),
            _ => None,
        })
        .sum();
    assert_eq!(moved, 3 * 4096);
}

#[test]
fn r25_with_solo_needs_grant_a_primary_holds_writes_a_peer_missed_until_granted() {
    let mut c = Cluster::connected(2, |_, cfg| cfg.solo_needs_grant = true);
    c.submit(0, 1, w(0, 0x1, 1, false));
    c.run();
    assert!(c.done(0, 1).is_some(), "with the peer, writes complete");
    c.break_link(0, 1);
    c.run();
    c.submit(0, 2, w(4096, 0x2, 1, false));
    c.run();
    assert_eq!(c.done(0, 2), None, "held: the peer missed it");
    let q = c.nodes[0].r.quorum();
    assert_eq!(
        (q.all_replicating, q.solo_granted, q.held),
        (false, false, 1)
    );
    c.nodes[0].r.grant_solo(c.now);
    c.run();
    assert_eq!(c.done(0, 2), Some(Ok(())));
    // Lost the arbitration instead: held requests fail.
    c.nodes[0].r.revoke_solo();
    c.submit(0, 3, w(8192, 0x3, 1, false));
    c.run();
    assert_eq!(c.done(0, 3), None);
    c.nodes[0].r.fail_held(c.now, errno::EIO);
    c.run();
    assert_eq!(c.done(0, 3), Some(Err(errno::EIO)));
    assert_eq!(c.nodes[0].r.requests_in_flight(), 0);
    c.demote(0);
}

#[test]
fn a_restarted_node_resumes_from_its_metadata() {
    let mut c = Cluster::connected(2, |_, cfg| {
        cfg.bitmap_chunk = 1024;
        cfg.extent_size = 1024;
    });
    c.break_link(0, 1);
    c.run();
    for k in 0..8u64 {
        c.submit(0, 1 + k, w(k * 4096, 0x10 + k as u8, 1, false));
    }
    c.run();
    assert_eq!(c.status(0, 1).out_of_sync_bytes, 8 * 1024);
    // The primary restarts: its bitmap and generation survive.
    c.restart(0);
    c.nodes[0].r.promote(c.now).unwrap();
    assert_eq!(c.status(0, 1).out_of_sync_bytes, 8 * 1024);
    // Resync, interrupted after some chunks by the target crashing.
    c.nodes[1].hold_io = true;
    c.connect(0, 1);
    c.run();
    // The target performs its first few I/Os (the Inconsistent record,
    // then resync writes), and their acks reach the source.
    for _ in 0..4 {
        c.do_io(1);
        c.drain(1);
    }
    while c.deliver(1, 0) {
        c.drain(0);
    }
    c.restart(1);
    c.nodes[1].hold_io = false;
    assert_eq!(c.nodes[1].r.disk_state(), DiskState::Inconsistent);
    let left = c.status(0, 1).out_of_sync_bytes;
    assert!(left < 8 * 1024 && left > 0, "partly synced: {left}");
    // It resumes where it stopped, and ends identical.
    c.connect(0, 1);
    c.run();
    assert_eq!(c.nodes[1].r.disk_state(), DiskState::UpToDate);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    let moved: u64 = c.nodes[0]
        .events
        .iter()
        .filter_map(|e| match e {
            Event::SyncFinished { bytes, .. } => Some(*bytes),
            _ => None,
        })
        .sum();
    assert_eq!(moved, left, "the second sync moved only what was left");
}

#[test]
fn writes_a_restarted_peer_had_not_flushed_are_resynced() {
    let mut c = Cluster::connected(2, |_, cfg| {
        cfg.bitmap_chunk = 512;
        cfg.extent_size = 8192;
    });
    // Flushed, then two unflushed writes in extents 0 and 2.
    c.submit(0, 1, w(0, 1, 1, false));
    c.submit(0, 2, Op::Flush);
    c.submit(0, 3, w(512, 2, 1, false));
    c.submit(0, 4, w(2 * 8192, 3, 1, false));
    c.run();
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    // b crashes and loses its unflushed writes.
    c.restart(1);
    c.nodes[1].disk[512..1024].fill(0);
    c.nodes[1].disk[2 * 8192..2 * 8192 + 512].fill(0);
    c.connect(0, 1);
    c.run();
    assert_eq!(c.nodes[1].r.disk_state(), DiskState::UpToDate);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk, "lost writes restored");
    // Exactly the two unflushed extents moved.
    assert!(c.nodes[0].events.contains(&Event::SyncFinished {
        peer: pid(0, 1),
        role: SyncRole::Source,
        bytes: 2 * 8192
    }));
    // A link blip without a restart moves nothing.
    c.submit(0, 5, w(4 * 8192, 4, 1, false));
    c.run();
    c.break_link(0, 1);
    c.connect(0, 1);
    c.run();
    assert!(c.nodes[0].events.contains(&Event::SyncFinished {
        peer: pid(0, 1),
        role: SyncRole::Source,
        bytes: 0
    }));
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
}

#[test]
fn a_replica_created_inconsistent_takes_a_full_sync_skipping_zeroes() {
    let mut c = Cluster::new(2, |i, cfg| {
        if i == 1 {
            cfg.initial_disk = DiskState::Inconsistent;
        }
    });
    // b holds garbage, a has data in one chunk.
    c.nodes[1].disk.fill(0xee);
    c.submit(0, 1, w(8192, 7, 2, false));
    c.run();
    assert_eq!(
        c.nodes[1].r.promote(c.now),
        Err(RoleError::DiskNotUpToDate(DiskState::Inconsistent))
    );
    c.connect(0, 1);
    c.run();
    assert_eq!(c.nodes[1].r.disk_state(), DiskState::UpToDate);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk, "garbage replaced");
    // Every chunk moved, but only the written one as data.
    assert!(c.nodes[0].events.contains(&Event::SyncFinished {
        peer: pid(0, 1),
        role: SyncRole::Source,
        bytes: SIZE
    }));
    let data_bytes: usize = c.nodes[1]
        .log
        .iter()
        .filter_map(|o| match o {
            Op::Write { data, .. } => Some(data.len()),
            _ => None,
        })
        .sum();
    assert!(
        data_bytes <= 1 << 20,
        "zero regions sent as data: {data_bytes}"
    );
    assert!(c.nodes[1]
        .log
        .iter()
        .any(|o| matches!(o, Op::WriteZeroes { .. })));
}

#[test]
fn r20_after_a_primary_crash_only_activity_log_extents_are_resynced() {
    let mut c = Cluster::connected(2, |_, cfg| {
        cfg.bitmap_chunk = 512;
        cfg.extent_size = 4096;
        cfg.al_extents = 3;
    });
    // Writes in extents 0, 3, 5 and 9: the log keeps the last three.
    for (k, e) in [0u64, 3, 5, 9].into_iter().enumerate() {
        c.submit(0, k as u64 + 1, w(e * 4096, k as u8 + 1, 1, false));
        c.run();
    }
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    // A write reaches the primary's disk but not the peer, and the primary
    // crashes before anyone is told.
    c.links[0][1].hold = true;
    c.submit(0, 9, w(9 * 4096 + 512, 0x99, 1, false));
    c.run();
    assert_ne!(c.nodes[0].disk, c.nodes[1].disk);
    c.links[0][1].hold = false;
    c.restart(0);
    c.run();
    let recovered = c.nodes[0].events.iter().rev().find_map(|e| match e {
        Event::ActivityLogRecovered { extents, bytes } => Some((*extents, *bytes)),
        _ => None,
    });
    assert_eq!(
        recovered,
        Some((3, 3 * 4096)),
        "the log held extents 3, 5, 9"
    );
    // It comes back as Primary; the peer is resynced from it.
    c.nodes[0].r.promote(c.now).unwrap();
    c.connect(0, 1);
    c.run();
    assert_eq!(c.status(0, 1).repl, ReplState::Established);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk, "the unacknowledged write");
    assert!(c.nodes[0].events.contains(&Event::SyncFinished {
        peer: pid(0, 1),
        role: SyncRole::Source,
        bytes: 3 * 4096
    }));
    // Demoting empties the log: a later restart resyncs nothing.
    c.demote(0);
    c.run();
    c.restart(0);
    c.run();
    assert_eq!(
        c.nodes[0]
            .events
            .iter()
            .filter(|e| matches!(e, Event::ActivityLogRecovered { .. }))
            .count(),
        1
    );
}

/// An extent leaves the activity log only once its writes are durable on
/// every replica: the peer flushed them (the Primary asks it to) and the
/// local disk did (a flush performed after the last write there and before
/// the log that drops it). Otherwise a Primary crash could lose a
/// completed write from one disk while no log or bitmap says the extent
/// differs (found by the simulator).
#[test]
fn r20_an_extent_leaves_the_log_only_after_both_replicas_flushed_it() {
    let mut c = Cluster::connected(2, |_, cfg| {
        cfg.bitmap_chunk = 512;
        cfg.extent_size = 4096;
        cfg.al_extents = 1;
    });
    c.submit(0, 1, w(0, 1, 1, false));
    c.run();
    assert_eq!(c.done(0, 1), Some(Ok(())));
    let flushes = |n: &Node| n.log.iter().filter(|o| **o == Op::Flush).count();
    assert_eq!(flushes(&c.nodes[1]), 0, "nobody flushed yet");
    // A write to another extent evicts extent 0.
    c.submit(0, 2, w(3 * 4096, 2, 1, false));
    c.run();
    assert_eq!(c.done(0, 2), Some(Ok(())));
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    assert!(flushes(&c.nodes[1]) >= 1, "the peer was asked to flush");
    let n = &c.nodes[0];
    let (at, extents) = n
        .al_log
        .iter()
        .find(|(_, e)| !e.contains(&0))
        .expect("a log without extent 0 was written");
    assert_eq!(extents, &vec![3]);
    let last_write = n
        .log
        .iter()
        .rposition(|o| matches!(o, Op::Write { offset: 0, .. }))
        .expect("the first write");
    assert!(
        n.log[last_write..*at].contains(&Op::Flush),
        "a local flush between the write in extent 0 and the log dropping it: {:?}",
        n.log
    );
    // No frontend request saw the internal flush.
    assert_eq!(c.nodes[0].done.len(), 2);
    // Demoting waits for the same: the peer flushes the write in extent 3.
    c.submit(0, 3, w(3 * 4096 + 512, 3, 1, false));
    c.run();
    let before = flushes(&c.nodes[1]);
    c.demote(0);
    assert!(flushes(&c.nodes[1]) > before);
    // With the peer gone, the local flush is what the log waits for.
    c.nodes[0].r.promote(c.now).unwrap();
    c.break_link(0, 1);
    c.submit(0, 4, w(3 * 4096, 4, 1, false));
    c.run();
    let flushes_before = flushes(&c.nodes[0]);
    c.submit(0, 5, w(5 * 4096, 5, 1, false));
    c.run();
    assert_eq!(c.done(0, 5), Some(Ok(())));
    let n = &c.nodes[0];
    let (at, _) = n
        .al_log
        .iter()
        .rev()
        .find(|(_, e)| e == &vec![5])
        .expect("the log moved to extent 5");
    assert!(
        n.log[..*at].iter().filter(|o| **o == Op::Flush).count() > flushes_before,
        "a local flush before the log dropped extent 3: {:?}",
        n.log
    );
}

/// Admitting a request never evicts an extent the request itself needs
/// (found by the simulator, seed 1182: a write spanning a hot and a cold
/// extent evicted the hot one and was written outside the log).
#[test]
fn r20_a_request_never_evicts_its_own_extents() {
    let mut c = Cluster::connected(2, |_, cfg| {
        cfg.bitmap_chunk = 512;
        cfg.extent_size = 4096;
        cfg.al_extents = 2;
    });
    // Extent 1 hot and flushed everywhere (free to go); extent 5 hot with
    // a write the peer has not acknowledged (held).
    c.submit(0, 1, w(4096, 1, 1, false));
    c.run();
    c.submit(0, 2, Op::Flush);
    c.run();
    c.links[0][1].hold = true;
    c.submit(0, 3, w(5 * 4096, 3, 1, false));
    c.run();
    // This write needs extents 1 and 2: the only free extent is its own.
    c.submit(0, 4, w(2 * 4096 - 512, 4, 2, false));
    c.run();
    for (_, extents) in &c.nodes[0].al_log {
        assert!(
            !extents.contains(&2) || extents.contains(&1),
            "extent 1 left the log while a write there was admitted: {extents:?}"
        );
    }
    c.links[0][1].hold = false;
    c.run();
    assert_eq!(c.done(0, 4), Some(Ok(())));
    let (_, last) = c.nodes[0].al_log.last().expect("log writes");
    assert_eq!(last, &vec![1, 2]);
    // A request wider than the whole log still goes through.
    c.submit(0, 5, w(0, 5, 8 * 3, false));
    c.run();
    assert_eq!(c.done(0, 5), Some(Ok(())));
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
}

#[test]
fn r21_a_fixed_resync_rate_spaces_the_resync_out() {
    // 32 KiB dirty at 16 KiB/s: about two seconds, in small runs.
    let mut c = Cluster::connected(2, |_, cfg| {
        cfg.bitmap_chunk = 512;
        cfg.resync_rate = 16 << 10;
    });
    c.break_link(0, 1);
    c.run();
    c.submit(0, 1, w(0, 0x5a, 64, false));
    c.run();
    assert_eq!(c.status(0, 1).out_of_sync_bytes, 32 << 10);
    c.connect(0, 1);
    c.run();
    let left = |c: &Cluster| c.status(0, 1).out_of_sync_bytes;
    assert!(left(&c) > 28 << 10, "no burst: {} left", left(&c));
    for _ in 0..10 {
        c.advance(Duration::from_millis(100));
    }
    let after_1s = left(&c);
    assert!(
        (12 << 10..=20 << 10).contains(&after_1s),
        "about 16 KiB moved in a second: {after_1s} left"
    );
    for _ in 0..15 {
        c.advance(Duration::from_millis(100));
    }
    assert_eq!(left(&c), 0);
    assert_eq!(c.status(0, 1).repl, ReplState::Established);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
}

#[test]
fn r21_adaptive_resync_yields_to_frontend_writes() {
    let mut c = Cluster::connected(2, |_, cfg| cfg.bitmap_chunk = 512);
    c.break_link(0, 1);
    c.run();
    for k in 0..64u64 {
        c.submit(0, 1 + k, w(k * 1024, 1, 1, false));
    }
    c.run();
    // Reconnect with a frontend write in flight (its local I/O held): at
    // most 2 resync reads start; once it is done the window opens.
    c.nodes[0].hold_io = true;
    c.submit(0, 100, w(60 << 10, 2, 1, false));
    c.connect(0, 1);
    c.run();
    let reads = |c: &Cluster| {
        c.nodes[0]
            .io
            .iter()
            .filter(|(_, x)| matches!(x, NodeIo::Read(..)))
            .count()
    };
    assert_eq!(reads(&c), 2, "resync held back while the frontend is busy");
    c.nodes[0].hold_io = false;
    c.run();
    assert_eq!(c.done(0, 100), Some(Ok(())));
    assert_eq!(c.status(0, 1).repl, ReplState::Established);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
}

// ---- R22: online verify ----

/// Performs every verify/resync read queued on node `i`, leaving its other
/// (held) I/O alone.
fn serve_reads(c: &mut Cluster, i: usize) {
    while let Some(k) = c.nodes[i]
        .io
        .iter()
        .position(|(_, x)| matches!(x, NodeIo::Read(..)))
    {
        if let Some(e) = c.nodes[i].io.remove(k) {
            c.nodes[i].io.push_front(e);
        }
        c.do_io(i);
        c.drain(i);
    }
}

fn verify_events(n: &Node) -> Vec<&Event> {
    n.events
        .iter()
        .filter(|e| matches!(e, Event::VerifyFinished { .. }))
        .collect()
}

#[test]
fn r22_online_verify_finds_exactly_the_corrupted_blocks() {
    let mut c = Cluster::connected(2, |_, _| {});
    for k in 0..16u64 {
        c.submit(0, 1 + k, w(k * 4096, k as u8 + 1, 8, false));
    }
    c.run();
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    let p = pid(0, 1);
    // Clean replicas: nothing differs.
    c.nodes[0].r.start_verify(c.now, p, false).unwrap();
    c.run();
    let s = c.nodes[0].r.verify_status(p).unwrap();
    assert!(s.finished && s.aborted.is_none(), "{s:?}");
    assert_eq!((s.done_bytes, s.total_bytes), (SIZE, SIZE));
    assert_eq!(s.differing_bytes, 0);
    assert!(s.ranges.is_empty());
    // Corrupt blocks 2, 3 and 9 and one byte of the last block on b.
    c.nodes[1].disk[2 * 4096..4 * 4096].fill(0xee);
    c.nodes[1].disk[9 * 4096 + 17] ^= 0x40;
    c.nodes[1].disk[15 * 4096 + 4095] ^= 1;
    c.nodes[0].r.start_verify(c.now, p, false).unwrap();
    c.run();
    let s = c.nodes[0].r.verify_status(p).unwrap();
    assert!(s.finished && s.aborted.is_none() && !s.marked);
    assert_eq!(
        s.ranges,
        vec![(8192, 16384), (36864, 40960), (61440, 65536)],
        "exactly the corrupted blocks"
    );
    assert_eq!(s.differing_bytes, 4 * 4096);
    assert_eq!(s.skipped_bytes, 0);
    let ev = verify_events(&c.nodes[0]);
    assert_eq!(ev.len(), 2);
    assert!(matches!(
        ev[1],
        Event::VerifyFinished { differing_bytes, aborted: None, marked: false, .. }
            if *differing_bytes == 4 * 4096
    ));
    // Nothing was changed: the replicas still differ, still Established.
    assert_ne!(c.nodes[0].disk, c.nodes[1].disk);
    assert_eq!(c.status(0, 1).repl, ReplState::Established);
    // Refusals: against the Primary, and with the peer gone.
    assert!(matches!(
        c.nodes[1].r.start_verify(c.now, pid(1, 0), false),
        Err(VerifyError::PeerIsPrimary(_))
    ));
    c.break_link(0, 1);
    c.run();
    assert!(matches!(
        c.nodes[0].r.start_verify(c.now, p, false),
        Err(VerifyError::NotConnected(_))
    ));
}

#[test]
fn r22_concurrent_writes_do_not_produce_false_positives() {
    let mut c = Cluster::connected(2, |_, _| {});
    let p = pid(0, 1);
    // A write on its disk at a and not yet at b (b's I/O held) during the
    // whole verify: the block differs in every check, but was disturbed.
    c.nodes[1].hold_io = true;
    c.submit(0, 1, w(5 * 4096, 0x77, 8, false));
    c.run();
    assert_ne!(c.nodes[0].disk, c.nodes[1].disk);
    c.nodes[0].r.start_verify(c.now, p, false).unwrap();
    for _ in 0..100 {
        c.run();
        serve_reads(&mut c, 1);
        if c.nodes[0].r.verify_status(p).unwrap().finished {
            break;
        }
    }
    let s = c.nodes[0].r.verify_status(p).unwrap();
    assert!(s.finished && s.aborted.is_none());
    assert_eq!(s.differing_bytes, 0, "no false positive: {:?}", s.ranges);
    assert_eq!(
        s.skipped_bytes, 4096,
        "given up after {MAX_ATTEMPTS} checks"
    );
    // A write that starts while a request is in flight: b has applied
    // the write before serving the request, a reads its disk before.
    c.nodes[1].hold_io = false;
    c.run();
    assert_eq!(c.done(0, 1), Some(Ok(())));
    c.nodes[0].hold_io = true;
    c.nodes[0].r.start_verify(c.now, p, false).unwrap();
    c.run();
    c.submit(0, 2, w(7 * 4096, 0x78, 8, false));
    c.run();
    serve_reads(&mut c, 1); // b reads only after applying the write
    c.nodes[0].hold_io = false;
    // a's own read goes first: its disk does not have the write yet.
    serve_reads(&mut c, 0);
    c.run();
    let s = c.nodes[0].r.verify_status(p).unwrap();
    assert!(s.finished && s.aborted.is_none());
    assert_eq!(s.differing_bytes, 0, "no false positive: {:?}", s.ranges);
    assert_eq!(s.skipped_bytes, 0);
    assert_eq!(c.done(0, 2), Some(Ok(())));
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
}

#[test]
fn r22_disconnect_aborts_verify() {
    let mut c = Cluster::connected(2, |_, _| {});
    let p = pid(0, 1);
    c.links[1][0].hold = true;
    c.nodes[0].r.start_verify(c.now, p, true).unwrap();
    c.run();
    let s = c.nodes[0].r.verify_status(p).unwrap();
    assert!(!s.finished);
    assert!(matches!(
        c.nodes[0].r.start_verify(c.now, p, false),
        Err(VerifyError::AlreadyRunning(_))
    ));
    c.break_link(0, 1);
    c.run();
    let s = c.nodes[0].r.verify_status(p).unwrap();
    assert!(s.finished && !s.marked);
    assert_eq!(s.aborted.as_deref(), Some("peer disconnected"));
    assert!(matches!(
        verify_events(&c.nodes[0])[..],
        [Event::VerifyFinished {
            aborted: Some(_),
            ..
        }]
    ));
    // Nothing marked, the reconnect finds the replicas in sync.
    c.connect(0, 1);
    c.run();
    assert_eq!(c.status(0, 1).repl, ReplState::Established);
    assert_eq!(c.status(0, 1).out_of_sync_bytes, 0);
    c.nodes[0].r.start_verify(c.now, p, false).unwrap();
    c.run();
    assert!(c.nodes[0].r.verify_status(p).unwrap().finished);
}

#[test]
fn r22_marked_blocks_are_resynced() {
    let mut c = Cluster::connected(2, |_, cfg| cfg.bitmap_chunk = 4096);
    for k in 0..16u64 {
        c.submit(0, 1 + k, w(k * 4096, k as u8 + 1, 8, false));
    }
    c.run();
    c.nodes[1].disk[3 * 4096..4 * 4096].fill(0);
    c.nodes[1].disk[12 * 4096 + 100] ^= 0xff;
    let p = pid(0, 1);
    c.nodes[0].r.start_verify(c.now, p, true).unwrap();
    c.run();
    let s = c.nodes[0].r.verify_status(p).unwrap();
    assert!(s.finished && s.marked);
    assert_eq!(s.ranges, vec![(12288, 16384), (49152, 53248)]);
    // The marks are durable and the connection closed to resync them.
    assert!(c.nodes[0]
        .disconnects
        .iter()
        .any(|(_, why)| why.contains("verify")));
    assert_eq!(c.status(0, 1).out_of_sync_bytes, 2 * 4096);
    c.connect(0, 1);
    c.run();
    assert_eq!(c.status(0, 1).repl, ReplState::Established);
    assert_eq!(c.status(0, 1).out_of_sync_bytes, 0);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    // Only the marked chunks moved.
    let moved: u64 = c.nodes[0]
        .events
        .iter()
        .filter_map(|e| match e {
            Event::SyncFinished { bytes, .. } => Some(*bytes),
            _ => None,
        })
        .sum();
    assert_eq!(moved, 2 * 4096);
    c.nodes[0].r.start_verify(c.now, p, false).unwrap();
    c.run();
    let s = c.nodes[0].r.verify_status(p).unwrap();
    assert!(s.finished && s.differing_bytes == 0);
}

// ---- R23: local disk errors (detach) ----

impl Cluster {
    fn read(&mut self, i: usize, req: u64, offset: u64, len: u64, local_error: Option<i32>) {
        let now = self.now;
        self.nodes[i].r.handle(
            now,
            Input::FrontendRead {
                req: ReqId(req),
                offset,
                len,
                local_error,
            },
        );
    }

    fn read_result(&self, i: usize, req: u64) -> Option<Result<Bytes, i32>> {
        self.nodes[i]
            .reads
            .iter()
            .find(|(r, _)| *r == ReqId(req))
            .map(|(_, res)| res.clone())
    }
}

#[test]
fn r23_a_primary_detaches_on_a_write_error_and_continues_through_its_peer() {
    let mut c = Cluster::connected(2, |_, _| {});
    c.submit(0, 1, w(0, 0x11, 2, false));
    c.run();
    // The local write fails; the peer has it: the request completes OK.
    c.nodes[0].fail_io = Some(errno::EIO);
    c.submit(0, 2, w(0, 0x22, 1, false));
    c.run();
    assert_eq!(c.done(0, 2), Some(Ok(())));
    assert_eq!(c.nodes[0].r.disk_state(), DiskState::Diskless);
    assert!(c.nodes[0].r.is_detached());
    assert!(c.nodes[0]
        .events
        .contains(&Event::Detached { errno: errno::EIO }));
    assert_eq!(c.status(1, 0).disk, Some(DiskState::Diskless));
    assert_eq!(c.nodes[1].r.disk_state(), DiskState::UpToDate);
    assert_eq!(&c.nodes[1].disk[..512], &[0x22; 512][..]);
    // The peer adopted the generation drawn at the detach.
    assert_eq!(
        c.nodes[1].r.current_generation(),
        c.nodes[0].r.current_generation()
    );
    // Later writes, trims and flushes go to the peer only; nothing touches
    // the detached disk, not even metadata.
    let (log, meta) = (c.nodes[0].log.len(), c.nodes[0].meta.clone());
    c.submit(0, 3, w(1024, 0x33, 1, true));
    c.submit(
        0,
        4,
        Op::Trim {
            offset: 4096,
            len: 512,
            fua: false,
        },
    );
    c.submit(0, 5, Op::Flush);
    c.run();
    for req in 3..=5 {
        assert_eq!(c.done(0, req), Some(Ok(())), "request {req}");
    }
    assert_eq!(c.nodes[0].log.len(), log);
    assert_eq!(c.nodes[0].meta, meta);
    assert!(c.nodes[0].io.is_empty());
    assert_eq!(&c.nodes[1].disk[1024..1536], &[0x33; 512][..]);
    // Reads go through the peer.
    c.read(0, 10, 0, 1024, None);
    c.read(0, 11, 1024, 512, None);
    c.run();
    let mut want = vec![0x22u8; 512];
    want.extend_from_slice(&[0x11; 512]);
    assert_eq!(c.read_result(0, 10), Some(Ok(Bytes::from(want))));
    assert_eq!(
        c.read_result(0, 11),
        Some(Ok(Bytes::from(vec![0x33u8; 512])))
    );
    // A reconnect while detached: no resync either way, I/O continues.
    c.break_link(0, 1);
    c.run();
    c.connect(0, 1);
    c.run();
    assert_eq!(c.status(0, 1).repl, ReplState::Established);
    c.submit(0, 6, w(2048, 0x66, 1, false));
    c.run();
    assert_eq!(c.done(0, 6), Some(Ok(())));
    assert_eq!(&c.nodes[1].disk[2048..2560], &[0x66; 512][..]);
    // A Diskless node is never promoted.
    c.demote(0);
    assert_eq!(
        c.nodes[0].r.promote(c.now),
        Err(RoleError::DiskNotUpToDate(DiskState::Diskless))
    );
}

#[test]
fn r23_without_an_up_to_date_peer_io_fails_with_eio() {
    // No peer connected: the failing write and everything after it fail.
    let mut c = Cluster::new(2, |_, _| {});
    c.submit(0, 1, w(0, 1, 1, false));
    c.run();
    assert_eq!(c.done(0, 1), Some(Ok(())));
    c.nodes[0].fail_io = Some(errno::EIO);
    c.submit(0, 2, w(0, 2, 1, false));
    c.run();
    assert_eq!(c.done(0, 2), Some(Err(errno::EIO)));
    assert_eq!(c.nodes[0].r.disk_state(), DiskState::Diskless);
    c.submit(0, 3, w(512, 3, 1, false));
    c.submit(0, 4, Op::Flush);
    c.read(0, 5, 0, 512, None);
    c.run();
    assert_eq!(c.done(0, 3), Some(Err(errno::EIO)));
    assert_eq!(c.done(0, 4), Some(Err(errno::EIO)));
    assert_eq!(c.read_result(0, 5), Some(Err(errno::EIO)));
    // The peer lost while a detached write waits for its ack: EIO too
    // (the data is nowhere safe).
    let mut c = Cluster::connected(2, |_, _| {});
    c.nodes[0].fail_io = Some(errno::EIO);
    c.submit(0, 1, w(0, 1, 1, false));
    c.run();
    assert_eq!(c.done(0, 1), Some(Ok(())));
    c.links[1][0].hold = true;
    c.submit(0, 2, w(0, 2, 1, false));
    c.run();
    assert_eq!(c.done(0, 2), None);
    c.break_link(0, 1);
    c.run();
    assert_eq!(c.done(0, 2), Some(Err(errno::EIO)));
}

#[test]
fn r23_a_local_read_error_detaches_and_retries_through_the_peer() {
    let mut c = Cluster::connected(2, |_, _| {});
    c.submit(0, 1, w(0, 0x5a, 2, false));
    c.run();
    // Attached: a FrontendRead is served from the local disk.
    c.read(0, 2, 0, 512, None);
    c.run();
    assert_eq!(
        c.read_result(0, 2),
        Some(Ok(Bytes::from(vec![0x5au8; 512])))
    );
    assert!(!c.nodes[0].r.is_detached());
    // The driver's own local read failed: detach, read through the peer.
    c.read(0, 3, 512, 512, Some(errno::EIO));
    c.run();
    assert!(c.nodes[0].r.is_detached());
    assert_eq!(
        c.read_result(0, 3),
        Some(Ok(Bytes::from(vec![0x5au8; 512])))
    );
    // Invalid reads are refused without I/O.
    c.read(0, 4, 1, 512, None);
    c.read(0, 5, SIZE, 512, None);
    c.run();
    assert_eq!(c.read_result(0, 4), Some(Err(errno::EINVAL)));
    assert_eq!(c.read_result(0, 5), Some(Err(errno::ENOSPC)));
    // A read in flight when its peer is lost: no other peer, EIO.
    c.links[1][0].hold = true;
    c.read(0, 6, 0, 512, None);
    c.run();
    assert_eq!(c.read_result(0, 6), None);
    c.break_link(0, 1);
    c.run();
    assert_eq!(c.read_result(0, 6), Some(Err(errno::EIO)));
}

#[test]
fn r23_reads_retry_on_another_peer_when_one_fails() {
    let mut c = Cluster::connected(3, |_, _| {});
    c.submit(0, 1, w(0, 0x77, 1, false));
    c.run();
    c.nodes[0].fail_io = Some(errno::EIO);
    c.submit(0, 2, w(512, 0x78, 1, false));
    c.run();
    assert_eq!(c.done(0, 2), Some(Ok(())));
    assert!(c.nodes[0].r.is_detached());
    // Both peers adopted the generation drawn at the detach.
    for i in 1..3 {
        assert_eq!(
            c.nodes[i].r.current_generation(),
            c.nodes[0].r.current_generation()
        );
    }
    // The first peer's disk fails the read: it detaches too, answers EIO,
    // and the read is retried on the other.
    c.nodes[1].hold_io = true;
    c.read(0, 3, 0, 1024, None);
    c.run();
    let (io, _) = c.nodes[1].io.pop_front().unwrap();
    let now = c.now;
    c.nodes[1].r.handle(
        now,
        Input::ReadDone {
            io,
            result: Err(errno::EIO),
        },
    );
    c.nodes[1].hold_io = false;
    c.run();
    assert!(c.nodes[1].r.is_detached());
    let mut want = vec![0x77u8; 512];
    want.extend_from_slice(&[0x78; 512]);
    assert_eq!(c.read_result(0, 3), Some(Ok(Bytes::from(want))));
    // A write now reaches the remaining UpToDate peer only, and completes.
    c.submit(0, 4, w(1024, 0x79, 1, false));
    c.run();
    assert_eq!(c.done(0, 4), Some(Ok(())));
    assert_eq!(&c.nodes[2].disk[1024..1536], &[0x79; 512][..]);
}

#[test]
fn r23_a_detached_secondary_is_resynced_from_the_primary_bitmap_after_restart() {
    let mut c = Cluster::connected(2, |_, _| {});
    c.submit(0, 1, w(0, 1, 4, false));
    c.run();
    c.nodes[1].fail_io = Some(errno::EIO);
    c.submit(0, 2, w(0, 2, 1, false));
    c.run();
    assert_eq!(c.done(0, 2), Some(Ok(())));
    assert!(c.nodes[1].r.is_detached());
    // It reconnects Diskless: connected, no resync, writes are not sent to
    // it and are marked in the Primary's bitmap.
    c.connect(0, 1);
    c.run();
    assert_eq!(c.status(0, 1).conn, ConnState::Connected);
    assert_eq!(c.status(0, 1).repl, ReplState::Off);
    assert_eq!(c.status(0, 1).disk, Some(DiskState::Diskless));
    let log = c.nodes[1].log.len();
    c.submit(0, 3, w(8192, 3, 2, false));
    c.run();
    assert_eq!(c.done(0, 3), Some(Ok(())));
    assert_eq!(c.nodes[1].log.len(), log);
    assert!(c.status(0, 1).out_of_sync_bytes > 0);
    // Re-attach = restart with a healthy disk: its metadata (written before
    // the failure) says UpToDate; the Primary's bitmap drives the resync.
    c.restart(1);
    c.connect(0, 1);
    c.run();
    assert_eq!(c.nodes[1].r.disk_state(), DiskState::UpToDate);
    assert_eq!(c.status(0, 1).repl, ReplState::Established);
    assert_eq!(c.status(0, 1).out_of_sync_bytes, 0);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
}

#[test]
fn r23_a_detached_primary_comes_back_as_a_full_sync_target() {
    // Small extents: the activity log alone would not cover the writes the
    // detached Primary issued through its peer.
    let mut c = Cluster::connected(2, |_, cfg| cfg.extent_size = 4096);
    c.submit(0, 1, w(0, 1, 4, false));
    c.run();
    c.nodes[0].fail_io = Some(errno::EIO);
    c.submit(0, 2, w(0, 2, 1, false));
    c.submit(0, 3, w(4096, 3, 1, false));
    c.run();
    assert_eq!(c.done(0, 2), Some(Ok(())));
    assert_eq!(c.done(0, 3), Some(Ok(())));
    assert_ne!(c.nodes[0].disk, c.nodes[1].disk);
    // Switch over: the detached node demotes, the peer takes over.
    c.demote(0);
    c.run();
    c.nodes[1].r.promote(c.now).unwrap();
    c.run();
    // The old Primary restarts with its disk back (its record still says
    // UpToDate, in the generation before the detach): it is a sync target.
    // The new Primary writes while it is away (diverging from it): the
    // writes the old one issued while detached must still be resynced.
    c.restart(0);
    c.submit(1, 10, w(8192, 0x10, 1, false));
    c.run();
    assert_eq!(c.done(1, 10), Some(Ok(())));
    c.connect(0, 1);
    c.run();
    assert!(c.nodes[1].events.contains(&Event::SyncStarted {
        peer: pid(1, 0),
        role: SyncRole::Source,
        bytes: SIZE
    }));
    assert!(c.nodes[1]
        .events
        .iter()
        .any(|e| matches!(e, Event::SyncFinished { .. })));
    assert_eq!(c.nodes[0].r.disk_state(), DiskState::UpToDate);
    assert_eq!(c.status(1, 0).repl, ReplState::Established);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
}

#[test]
fn r23_a_metadata_write_error_detaches_too() {
    let mut c = Cluster::connected(2, |_, _| {});
    c.break_link(0, 1);
    c.run();
    // The first write without the peer marks its bitmap: a metadata write.
    c.nodes[0].hold_meta = true;
    c.submit(0, 1, w(0, 1, 1, false));
    c.run();
    let k = c.nodes[0]
        .io
        .iter()
        .position(|(_, x)| matches!(x, NodeIo::Meta(..)))
        .unwrap();
    let (io, _) = c.nodes[0].io.remove(k).unwrap();
    let now = c.now;
    c.nodes[0].r.handle(
        now,
        Input::LocalDone {
            io,
            result: Err(errno::EIO),
        },
    );
    c.nodes[0].hold_meta = false;
    c.run();
    assert!(c.nodes[0].r.is_detached());
    // No peer to carry it: EIO, never a silent success.
    assert_eq!(c.done(0, 1), Some(Err(errno::EIO)));
    assert!(c.nodes[0].r.is_idle());
}

#[test]
fn r23_stray_read_replies_are_violations() {
    let mut c = Cluster::connected(2, |_, _| {});
    let now = c.now;
    c.nodes[0].r.handle(
        now,
        Input::PeerFrame {
            peer: pid(0, 1),
            frame: Frame::ReadReply {
                id: 9,
                status: 0,
                data: Bytes::new(),
            },
        },
    );
    c.run();
    assert!(c.nodes[0]
        .events
        .iter()
        .any(|e| matches!(e, Event::ProtocolViolation { .. })));
    // A misaligned read request, too.
    let mut c = Cluster::connected(2, |_, _| {});
    c.nodes[1].r.handle(
        now,
        Input::PeerFrame {
            peer: pid(1, 0),
            frame: Frame::ReadRequest {
                id: 1,
                offset: 3,
                len: 512,
            },
        },
    );
    c.run();
    assert!(c.nodes[1]
        .events
        .iter()
        .any(|e| matches!(e, Event::ProtocolViolation { .. })));
}

#[test]
fn r23_protocol_a_waits_for_the_peer_once_detached() {
    let mut c = Cluster::connected(2, |_, cfg| cfg.protocol = Protocol::A);
    c.nodes[0].fail_io = Some(errno::EIO);
    c.links[1][0].hold = true; // no acks come back
    c.submit(0, 1, w(0, 1, 1, false));
    c.run();
    // Attached, protocol A would complete on the local result; the local
    // write failed and the disk detached: only the peer's ack completes it.
    assert!(c.nodes[0].r.is_detached());
    assert_eq!(c.done(0, 1), None);
    c.submit(0, 2, w(512, 2, 1, false));
    c.run();
    assert_eq!(c.done(0, 2), None);
    c.links[1][0].hold = false;
    c.run();
    assert_eq!(c.done(0, 1), Some(Ok(())));
    assert_eq!(c.done(0, 2), Some(Ok(())));
    assert_eq!(
        &c.nodes[1].disk[..1024],
        &[[1u8; 512], [2u8; 512]].concat()[..]
    );
}

// ---- R26: checksum-based resync ----

/// Bytes of resync data node `i` wrote (`Write` ops with FUA: resync
/// writes; the tests below issue only non-FUA frontend writes).
fn resync_data_written(n: &Node) -> u64 {
    n.log
        .iter()
        .filter_map(|o| match o {
            Op::Write {
                data, fua: true, ..
            } => Some(data.len() as u64),
            _ => None,
        })
        .sum()
}

/// Two nodes with `checksums` on the source (node 0) and 4 KiB chunks;
/// every 4 KiB block holds distinct data on both. While apart, node 0
/// rewrites all 16 blocks: 13 with the data both already hold, 3 with new
/// data (one of them zeroes); node 1's copy of block 9 (rewritten
/// identically on node 0) is silently corrupted. Returns the cluster
/// reconnected and settled.
fn r26_scenario(checksums: bool) -> Cluster {
    let mut c = Cluster::connected(2, |i, cfg| {
        cfg.bitmap_chunk = 4096;
        cfg.resync_checksums = checksums && i == 0;
    });
    let block = |k: u64, byte: u8| w(k * 4096, byte, 8, false);
    for k in 0..16u64 {
        c.submit(0, 1 + k, block(k, k as u8 + 1));
    }
    c.run();
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    c.break_link(0, 1);
    c.run();
    for k in 0..16u64 {
        let byte = match k {
            3 => 0xa3,
            7 => 0xa7,
            12 => 0,
            _ => k as u8 + 1,
        };
        c.submit(0, 100 + k, block(k, byte));
    }
    c.run();
    c.nodes[1].disk[9 * 4096 + 17] ^= 0x40;
    assert_eq!(c.status(0, 1).out_of_sync_bytes, SIZE);
    c.nodes[1].log.clear();
    c.connect(0, 1);
    c.run();
    assert_eq!(c.status(0, 1).repl, ReplState::Established);
    assert_eq!(c.status(0, 1).out_of_sync_bytes, 0);
    assert_eq!(c.nodes[1].r.disk_state(), DiskState::UpToDate);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk, "replicas identical");
    c
}

fn moved(n: &Node) -> u64 {
    n.events
        .iter()
        .filter_map(|e| match e {
            Event::SyncFinished {
                role: SyncRole::Source,
                bytes,
                ..
            } => Some(*bytes),
            _ => None,
        })
        .sum()
}

#[test]
fn r26_checksum_resync_moves_only_the_blocks_that_differ() {
    // Without checksums every marked chunk moves.
    let plain = r26_scenario(false);
    assert_eq!(moved(&plain.nodes[0]), SIZE);
    assert_eq!(resync_data_written(&plain.nodes[1]), SIZE - 4096);
    assert!(!plain.nodes[0]
        .events
        .iter()
        .any(|e| matches!(e, Event::SyncChecksums { .. })));

    // With them: blocks 3 and 7 (new data), 12 (new zeroes) and 9
    // (corrupted on the target) move; the 12 identical blocks do not.
    let c = r26_scenario(true);
    assert_eq!(moved(&c.nodes[0]), 4 * 4096);
    assert_eq!(resync_data_written(&c.nodes[1]), 3 * 4096);
    assert!(c.nodes[1]
        .log
        .iter()
        .any(|o| matches!(o, Op::WriteZeroes { offset, len: 4096, .. } if *offset == 12 * 4096)));
    let written: Vec<u64> = c.nodes[1]
        .log
        .iter()
        .filter_map(|o| match o {
            Op::Write {
                offset, fua: true, ..
            } => Some(*offset / 4096),
            _ => None,
        })
        .collect();
    assert_eq!(written, vec![3, 7, 9], "exactly the differing blocks");
    assert!(c.nodes[0].events.contains(&Event::SyncChecksums {
        peer: pid(0, 1),
        compared_bytes: SIZE,
        identical_bytes: SIZE - 4 * 4096,
    }));
    // The target only read and answered digests; its own setting is off.
    assert!(!c.nodes[1].r.config().resync_checksums);
}

#[test]
fn r26_checksum_resync_with_large_blocks_sends_whole_blocks() {
    // 8 KiB blocks: a difference in one 4 KiB digest block moves the whole
    // 8 KiB block (the target refuses misaligned resync data).
    let mut c = Cluster::connected(2, |_, cfg| {
        cfg.block_size = 8192;
        cfg.bitmap_chunk = 16384;
        cfg.resync_checksums = true;
    });
    c.submit(
        0,
        1,
        Op::Write {
            offset: 0,
            data: Bytes::from(vec![5u8; SIZE as usize]),
            fua: false,
        },
    );
    c.run();
    c.break_link(0, 1);
    c.run();
    c.submit(
        0,
        2,
        Op::Write {
            offset: 16384,
            data: Bytes::from(vec![5u8; 16384]),
            fua: false,
        },
    );
    c.run();
    c.nodes[1].disk[16384 + 4096 + 1] = 9;
    c.nodes[1].log.clear();
    c.connect(0, 1);
    c.run();
    assert_eq!(c.status(0, 1).repl, ReplState::Established);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    let writes: Vec<(u64, usize)> = c.nodes[1]
        .log
        .iter()
        .filter_map(|o| match o {
            Op::Write { offset, data, .. } => Some((*offset, data.len())),
            _ => None,
        })
        .collect();
    assert_eq!(writes, vec![(16384, 8192)]);
}

/// Node 0 (checksums on) has a resync towards node 1 running with node
/// 1's reads held: node 0's digest request for the one 8 KiB run is
/// unanswered and node 1 is a sync target.
fn r26_stalled() -> Cluster {
    r26_stalled_on(1)
}

/// Like [`r26_stalled`], with node `held`'s data I/O held instead.
fn r26_stalled_on(held: usize) -> Cluster {
    let mut c = Cluster::connected(2, |_, cfg| {
        cfg.bitmap_chunk = 4096;
        cfg.resync_checksums = true;
    });
    c.break_link(0, 1);
    c.run();
    c.submit(0, 1, w(8192, 3, 16, false));
    c.run();
    c.nodes[held].hold_io = true;
    c.connect(0, 1);
    c.run();
    assert_eq!(c.status(1, 0).repl, ReplState::SyncTarget);
    c
}

fn inject(c: &mut Cluster, to: usize, from: usize, frame: Frame) {
    let now = c.now;
    c.nodes[to].r.handle(
        now,
        Input::PeerFrame {
            peer: pid(to, from),
            frame,
        },
    );
    c.run();
}

fn violations(n: &Node) -> Vec<&'static str> {
    n.events
        .iter()
        .filter_map(|e| match e {
            Event::ProtocolViolation { what, .. } => Some(*what),
            _ => None,
        })
        .collect()
}

#[test]
fn r26_malformed_digest_frames_are_protocol_violations() {
    // A digest request to a node that is not a sync target.
    let mut c = Cluster::connected(2, |_, _| {});
    inject(
        &mut c,
        1,
        0,
        Frame::ResyncDigestRequest {
            id: 1,
            offset: 0,
            len: 4096,
        },
    );
    assert_eq!(
        violations(&c.nodes[1]),
        vec!["ResyncDigestRequest while not a sync target"]
    );

    // Requests beyond the end of the volume or misaligned.
    for (offset, len) in [(SIZE - 512, 4096), (3, 4096), (0, 1000), (SIZE, 512)] {
        let mut c = r26_stalled();
        inject(
            &mut c,
            1,
            0,
            Frame::ResyncDigestRequest { id: 9, offset, len },
        );
        assert_eq!(
            violations(&c.nodes[1]),
            vec!["ResyncDigestRequest outside the volume or misaligned"],
            "offset {offset} len {len}"
        );
        assert_eq!(c.status(1, 0).conn, ConnState::StandAlone);
    }

    // Replies the source did not ask for, of the wrong length, or twice.
    let bad_replies: [(Frame, &str); 3] = [
        (
            Frame::ResyncDigestReply {
                id: 77,
                status: 0,
                digests: vec![0; 2],
            },
            "ResyncDigestReply for a request it was not sent",
        ),
        (
            Frame::ResyncDigestReply {
                id: 1,
                status: 0,
                digests: vec![0; 3],
            },
            "ResyncDigestReply with the wrong number of digests",
        ),
        (
            Frame::ResyncDigestReply {
                id: 1,
                status: 0,
                digests: vec![0; 1],
            },
            "ResyncDigestReply with the wrong number of digests",
        ),
    ];
    for (f, why) in bad_replies {
        let mut c = r26_stalled();
        inject(&mut c, 0, 1, f);
        assert_eq!(violations(&c.nodes[0]), vec![why]);
        assert_eq!(c.status(0, 1).conn, ConnState::StandAlone);
    }
    // Node 0's own read is held and node 1's reply is in: a second reply
    // is a violation.
    let mut c = r26_stalled_on(0);
    assert!(violations(&c.nodes[0]).is_empty());
    inject(
        &mut c,
        0,
        1,
        Frame::ResyncDigestReply {
            id: 1,
            status: 0,
            digests: vec![0; 2],
        },
    );
    assert_eq!(
        violations(&c.nodes[0]),
        vec!["second ResyncDigestReply for a request"]
    );
    // A reply outside a resync.
    let mut c = Cluster::connected(2, |_, _| {});
    inject(
        &mut c,
        0,
        1,
        Frame::ResyncDigestReply {
            id: 1,
            status: 0,
            digests: Vec::new(),
        },
    );
    assert_eq!(
        violations(&c.nodes[0]),
        vec!["ResyncDigestReply without a resync"]
    );
    // The stalled resync itself completes once the reads are released.
    let mut c = r26_stalled();
    c.nodes[1].hold_io = false;
    c.run();
    assert_eq!(c.status(0, 1).repl, ReplState::Established);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
}

/// Two replicas ("a", "b", both Secondary) and a diskless client "c" (R28).
fn client_trio() -> Cluster {
    Cluster::new(3, |i, c| {
        c.initial_role = Role::Secondary;
        if i == 2 {
            c.diskless = true;
        } else {
            c.diskless_peers = vec!["c".into()];
        }
    })
}

#[test]
fn r28_a_diskless_client_starts_diskless_and_is_promoted_only_with_an_up_to_date_peer() {
    let mut c = client_trio();
    assert_eq!(c.nodes[2].r.disk_state(), DiskState::Diskless);
    let now = c.now;
    assert_eq!(c.nodes[2].r.promote(now), Err(RoleError::NoUpToDatePeer));
    c.connect(0, 1);
    c.connect(0, 2);
    c.connect(1, 2);
    c.run();
    assert_eq!(c.status(0, 2).disk, Some(DiskState::Diskless));
    assert_eq!(c.status(2, 0).disk, Some(DiskState::UpToDate));
    let gen = c.nodes[0].r.current_generation();
    c.nodes[2].r.promote(now).unwrap();
    c.run();
    assert_eq!(c.nodes[2].r.role(), Role::Primary);
    assert_eq!(c.status(0, 2).role, Some(Role::Primary));
    // A replica is not promoted while the client is Primary.
    assert!(c.nodes[0].r.promote(now).is_err());
    // The client has no generation of its own: the replicas keep theirs.
    assert_eq!(c.nodes[0].r.current_generation(), gen);
    assert_eq!(c.nodes[1].r.current_generation(), gen);
    // Nothing was ever written or read locally on the client.
    assert!(c.nodes[2].meta.is_empty());
    assert!(c.nodes[2].log.is_empty());
}

#[test]
fn r28_a_diskless_client_completes_writes_after_every_replica_acked_and_reads_through_them() {
    let mut c = client_trio();
    c.connect(0, 1);
    c.connect(0, 2);
    c.connect(1, 2);
    c.run();
    let now = c.now;
    c.nodes[2].r.promote(now).unwrap();
    let gen = c.nodes[0].r.current_generation();
    // "b" has not acknowledged yet: not complete, though "a" has the data.
    c.links[1][2].hold = true;
    c.submit(2, 1, w(0, 0x42, 2, true));
    c.submit(2, 2, Op::Flush);
    c.run();
    assert_eq!(c.done(2, 1), None);
    assert_eq!(&c.nodes[0].disk[..1024], &[0x42; 1024][..]);
    c.links[1][2].hold = false;
    c.run();
    assert_eq!(c.done(2, 1), Some(Ok(())));
    assert_eq!(c.done(2, 2), Some(Ok(())));
    assert_eq!(&c.nodes[1].disk[..1024], &[0x42; 1024][..]);
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    // Reads are forwarded to a replica.
    c.read(2, 10, 512, 1024, None);
    c.run();
    let mut want = vec![0x42u8; 512];
    want.extend_from_slice(&[0; 512]);
    assert_eq!(c.read_result(2, 10), Some(Ok(Bytes::from(want))));
    assert!(c.nodes[2].log.is_empty() && c.nodes[2].meta.is_empty());
    assert_eq!(c.nodes[0].r.current_generation(), gen);
    // The client demotes; a replica is promoted and writes with the client
    // connected: the client counts as missing nothing.
    c.demote(2);
    c.run();
    c.nodes[0].r.promote(now).unwrap();
    c.submit(0, 20, w(4096, 0x77, 1, false));
    c.run();
    assert_eq!(c.done(0, 20), Some(Ok(())));
    assert_eq!(c.nodes[0].disk, c.nodes[1].disk);
    assert!(c.nodes[0].r.quorum().all_replicating);
    assert_eq!(c.nodes[0].r.current_generation(), gen);
    assert!(!c.nodes[0]
        .events
        .iter()
        .any(|e| matches!(e, Event::PeerOutdated { .. })));
}

#[test]
fn r28_a_diskless_client_fails_io_with_eio_when_a_replica_is_missing() {
    let mut c = client_trio();
    c.connect(0, 1);
    c.connect(0, 2);
    c.connect(1, 2);
    c.run();
    let now = c.now;
    c.nodes[2].r.promote(now).unwrap();
    // A replica lost while the write waits for its ack: EIO, never OK.
    c.links[1][2].hold = true;
    c.submit(2, 1, w(0, 1, 1, false));
    c.run();
    assert_eq!(c.done(2, 1), None);
    c.break_link(1, 2);
    c.run();
    assert_eq!(c.done(2, 1), Some(Err(errno::EIO)));
    // With one replica missing, writes fail; reads still work through the
    // other one.
    c.submit(2, 2, w(512, 2, 1, false));
    c.read(2, 3, 0, 512, None);
    c.run();
    assert_eq!(c.done(2, 2), Some(Err(errno::EIO)));
    assert_eq!(c.read_result(2, 3), Some(Ok(Bytes::from(vec![1u8; 512]))));
    // No replica left: reads and writes fail with EIO too.
    c.break_link(0, 2);
    c.run();
    c.submit(2, 4, w(0, 4, 1, false));
    c.submit(2, 5, Op::Flush);
    c.read(2, 6, 0, 512, None);
    c.run();
    assert_eq!(c.done(2, 4), Some(Err(errno::EIO)));
    assert_eq!(c.done(2, 5), Some(Err(errno::EIO)));
    assert_eq!(c.read_result(2, 6), Some(Err(errno::EIO)));
    // A read in flight when its replica goes is retried on the other one.
    c.connect(0, 2);
    c.connect(1, 2);
    c.run();
    c.links[0][2].hold = true;
    c.read(2, 7, 0, 512, None);
    c.run();
    assert_eq!(c.read_result(2, 7), None);
    c.break_link(0, 2);
    c.run();
    assert_eq!(c.read_result(2, 7), Some(Ok(Bytes::from(vec![1u8; 512]))));
    // The replicas never diverged because of the client.
    assert_eq!(
        c.nodes[0].r.current_generation(),
        c.nodes[1].r.current_generation()
    );
    assert!(c.nodes[2].meta.is_empty() && c.nodes[2].log.is_empty());
}

fn grew(n: &Node) -> Vec<&Event> {
    n.events
        .iter()
        .filter(|e| matches!(e, Event::GrowFinished { .. }))
        .collect()
}

#[test]
fn r29_online_growth_grows_every_connected_peer_before_the_coordinator() {
    let new = SIZE * 2;
    let mut c = Cluster::connected(3, |_, _| {});
    c.submit(0, 1, w(0, 0x11, 4, true));
    c.run();
    // Peer b's disk is slow: the Primary must not take the new size yet.
    c.nodes[1].hold_io = true;
    assert_eq!(c.nodes[0].r.grow(c.now, new), Ok(true));
    c.run();
    assert_eq!(c.nodes[0].r.growing(), Some(new));
    assert!(c.nodes[0]
        .io
        .iter()
        .all(|(_, x)| !matches!(x, NodeIo::Grow(_))));
    assert_eq!(c.nodes[0].r.size(), SIZE);
    assert_eq!(c.nodes[2].r.size(), new, "c grew while b is still growing");
    assert_eq!(c.nodes[1].r.size(), SIZE);
    c.submit(0, 2, w(SIZE, 0x22, 1, false));
    c.run();
    assert!(
        matches!(c.nodes[0].done.last(), Some((ReqId(2), Err(_)))),
        "a write past the old end before the growth finished: {:?}",
        c.nodes[0].done
    );
    c.nodes[1].hold_io = false;
    c.run();
    for i in 0..3 {
        assert_eq!(c.nodes[i].r.size(), new, "node {i}");
        assert_eq!(c.nodes[i].r.growing(), None);
        assert_eq!(c.nodes[i].disk.len() as u64, new);
    }
    match grew(&c.nodes[0])[..] {
        [Event::GrowFinished {
            from,
            size,
            coordinator: true,
            result: Ok(()),
            failed,
        }] => {
            assert_eq!((*from, *size), (SIZE, new));
            assert!(failed.is_empty());
        }
        ref e => panic!("{e:?}"),
    }
    assert!(matches!(
        grew(&c.nodes[1])[..],
        [Event::GrowFinished {
            coordinator: false,
            result: Ok(()),
            ..
        }]
    ));
    // The new area takes writes, replicated to both peers; the old data
    // is intact everywhere; everybody is still connected.
    c.submit(0, 3, w(SIZE + 512, 0x33, 2, true));
    c.run();
    assert_eq!(c.nodes[0].done.last(), Some(&(ReqId(3), Ok(()))));
    for i in 0..3 {
        let d = &c.nodes[i].disk;
        assert!(d[..4 * BS as usize].iter().all(|b| *b == 0x11), "node {i}");
        let at = (SIZE + 512) as usize;
        assert!(d[at..at + 1024].iter().all(|b| *b == 0x33), "node {i}");
        assert!(d[SIZE as usize..at].iter().all(|b| *b == 0), "node {i}");
        for j in 0..3 {
            if i != j {
                assert_eq!(c.status(i, j).conn, ConnState::Connected, "{i}->{j}");
            }
        }
    }
    assert!(c.nodes.iter().all(|n| n.disconnects.is_empty()));
}

#[test]
fn r29_a_peer_that_cannot_grow_stops_the_growth_and_a_retry_completes_it() {
    let new = SIZE + 64 * 1024;
    let mut c = Cluster::connected(2, |_, _| {});
    c.nodes[1].fail_io = Some(errno::EIO);
    assert_eq!(c.nodes[0].r.grow(c.now, new), Ok(true));
    c.run();
    match grew(&c.nodes[0])[..] {
        [Event::GrowFinished {
            coordinator: true,
            result: Err(why),
            ..
        }] => assert!(why.contains("peer b could not grow"), "{why}"),
        ref e => panic!("{e:?}"),
    }
    assert_eq!((c.nodes[0].r.size(), c.nodes[1].r.size()), (SIZE, SIZE));
    assert_eq!(c.status(0, 1).conn, ConnState::Connected);
    // Refused before anything is asked: shrinking, unaligned, a Secondary
    // while the Primary is connected.
    assert!(matches!(
        c.nodes[0].r.grow(c.now, SIZE - 512),
        Err(GrowError::Shrink { .. })
    ));
    assert!(matches!(
        c.nodes[0].r.grow(c.now, SIZE + 1),
        Err(GrowError::Unaligned { .. })
    ));
    assert_eq!(
        c.nodes[1].r.grow(c.now, new),
        Err(GrowError::PeerIsPrimary("a".into()))
    );
    assert_eq!(c.nodes[0].r.grow(c.now, new), Ok(true));
    c.run();
    assert_eq!((c.nodes[0].r.size(), c.nodes[1].r.size()), (new, new));
    assert_eq!(c.status(0, 1).conn, ConnState::Connected);
}

#[test]
fn r29_replicas_of_different_sizes_do_not_connect_and_none_while_growing() {
    let new = SIZE * 4;
    let mut c = Cluster::new(2, |_, _| {});
    // Grown alone (no peer connected), and a handshake during the growth.
    c.nodes[0].hold_io = true;
    assert_eq!(c.nodes[0].r.grow(c.now, new), Ok(true));
    c.run();
    c.connect(0, 1);
    c.run();
    assert_eq!(c.status(0, 1).conn, ConnState::StandAlone);
    assert!(c.nodes[0].events.iter().any(
        |e| matches!(e, Event::HandshakeRefused { reason, by_us: true, .. } if reason.contains("growing"))
    ));
    c.nodes[0].hold_io = false;
    c.run();
    assert_eq!(c.nodes[0].r.size(), new);
    c.connect(0, 1);
    c.run();
    assert_eq!(c.status(0, 1).conn, ConnState::StandAlone);
    assert!(c.nodes[1].events.iter().any(|e| matches!(
        e,
        Event::HandshakeRefused { reason, .. }
            if reason.contains("size mismatch") && reason.contains("grow the smaller replica")
    )));
    // The Secondary grows alone too (no Primary connected): they connect.
    assert_eq!(c.nodes[1].r.grow(c.now, new), Ok(true));
    c.run();
    c.connect(0, 1);
    c.run();
    assert_eq!(c.status(0, 1).conn, ConnState::Connected);
    assert_eq!(
        c.nodes[0].r.grow(c.now, new),
        Ok(false),
        "same size: nothing to do"
    );
}

#[test]
fn r29_growth_that_moves_bitmap_slots_waits_for_a_clear_bitmap() {
    // 512 bytes per bit: one bitmap page covers 16 MiB.
    let mut c = Cluster::connected(2, |_, cfg| cfg.bitmap_chunk = 512);
    c.break_link(0, 1);
    c.submit(0, 1, w(0, 0x44, 1, true));
    c.run();
    assert_eq!(c.nodes[0].done.last(), Some(&(ReqId(1), Ok(()))));
    match c.nodes[0].r.grow(c.now, 32 << 20) {
        Err(GrowError::BitmapInUse {
            peer,
            max_same_layout,
            ..
        }) => {
            assert_eq!(peer, "b");
            assert_eq!(max_same_layout, 16 << 20);
        }
        other => panic!("{other:?}"),
    }
    // Within the same layout it grows; pages marked meanwhile are written
    // once it is done.
    c.nodes[0].hold_io = true;
    assert_eq!(c.nodes[0].r.grow(c.now, 16 << 20), Ok(true));
    c.run();
    let before = c.nodes[0].meta.len();
    c.nodes[0].hold_io = false;
    c.run();
    assert_eq!(c.nodes[0].r.size(), 16 << 20);
    assert!(c.nodes[0].meta.len() >= before);
    c.submit(0, 2, w((16 << 20) - 512, 0x55, 1, true));
    c.run();
    assert_eq!(c.nodes[0].done.last(), Some(&(ReqId(2), Ok(()))));
    assert_eq!(c.status(0, 1).out_of_sync_bytes, 1024);
}
