//! Several streams per peer without breaking the replica's ordering rules.
//!
//! The [`Replica`](super::Replica) was written against one ordered stream
//! per peer. One ordered stream lets a 32 MiB write hold back every small
//! frame queued behind it, so the driver spreads frames over *lanes*: the
//! control lane (one ordered stream) carries every frame except large
//! writes, which go round-robin over a few bulk lanes (one stream each).
//! Every frame travels in an [`Envelope`] carrying its send sequence number
//! and the sequence number of the last *barrier* frame sent before it; the
//! receiver's [`Reorder`] hands frames to the replica in an order the rules
//! allow:
//!
//! - **Barriers** — `Hello`, `HelloRefused`, `StateUpdate`, `Flush` and the
//!   resync and growth control frames — are
//!   delivered only after every frame sent before them was delivered, and
//!   every frame sent after a barrier waits for it. Handshakes, role and
//!   disk-state changes and the flush barrier (R5) therefore see exactly the
//!   order of one stream.
//! - **Free frames** — `Write`, `Trim`, `WriteZeroes`, `Ack`, `Ping`,
//!   `Pong` — between two barriers may overtake each other. That is safe in
//!   single-Primary operation because the Primary never has two overlapping
//!   requests in flight (R7), the Secondary sends only acks (matched by id),
//!   and a FLUSH covers only writes the peer had acknowledged (R3, R5).
//!
//! Dual-primary (R9) needs writes and acks in one order in each direction,
//! so the driver then uses the control lane alone ([`choose_lane`]).
//! Nothing here does I/O; the daemon owns the streams.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::frame::Frame;

/// Bytes of an encoded [`Envelope`] on the wire.
pub const ENVELOPE_LEN: usize = 20;
/// Writes with at least this many data bytes travel on a bulk lane.
pub const BULK_MIN: usize = 64 << 10;
/// Bulk lanes (streams) per peer and direction, besides the control lane.
pub const BULK_LANES: usize = 4;
/// Frames a receiver holds back at most before it calls the sender broken.
pub const MAX_HELD: usize = 1 << 16;

/// "No barrier sent yet" in [`Envelope::barrier`].
const NONE: u64 = u64::MAX;

/// Per-frame ordering information, sent in front of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    /// Send sequence number (0, 1, 2, … per connection and direction).
    pub seq: u64,
    /// Sequence number of the last barrier sent before this frame, if any.
    pub barrier: Option<u64>,
}

/// Why an envelope or its place in the sequence is invalid. The connection
/// is broken (the sender is buggy or hostile); the driver disconnects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaneError {
    /// The envelope's checksum does not match.
    #[error("envelope checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// Checksum in the envelope.
        stored: u32,
        /// Checksum of the received bytes.
        computed: u32,
    },
    /// A sequence number arrived twice.
    #[error("frame sequence number {0} arrived twice")]
    Duplicate(u64),
    /// A frame names a barrier that is not before it.
    #[error("frame {seq} names barrier {barrier}, which is not before it")]
    BadBarrier {
        /// The frame's sequence number.
        seq: u64,
        /// The barrier it names.
        barrier: u64,
    },
    /// A barrier frame arrived on a bulk lane, or a non-barrier frame was
    /// sent as one.
    #[error("frame {0} is on the wrong lane")]
    WrongLane(u64),
    /// Too many frames held back waiting for earlier ones.
    #[error("more than {MAX_HELD} frames waiting for earlier ones")]
    TooManyHeld,
}

impl Envelope {
    /// Encodes into `out` ([`ENVELOPE_LEN`] bytes, big-endian, CRC-32 last).
    pub fn encode(&self, out: &mut impl bytes::BufMut) {
        let mut b = [0u8; ENVELOPE_LEN];
        b[..8].copy_from_slice(&self.seq.to_be_bytes());
        b[8..16].copy_from_slice(&self.barrier.unwrap_or(NONE).to_be_bytes());
        let crc = crc32fast::hash(&b[..16]);
        b[16..].copy_from_slice(&crc.to_be_bytes());
        out.put_slice(&b);
    }

    /// Decodes the first [`ENVELOPE_LEN`] bytes of `b`; `Ok(None)` if `b` is
    /// shorter.
    pub fn decode(b: &[u8]) -> Result<Option<Envelope>, LaneError> {
        let Some(b) = b.get(..ENVELOPE_LEN) else {
            return Ok(None);
        };
        let mut seq = [0u8; 8];
        let mut barrier = [0u8; 8];
        let mut stored = [0u8; 4];
        seq.copy_from_slice(&b[..8]);
        barrier.copy_from_slice(&b[8..16]);
        stored.copy_from_slice(&b[16..20]);
        let stored = u32::from_be_bytes(stored);
        let computed = crc32fast::hash(&b[..16]);
        if stored != computed {
            return Err(LaneError::Checksum { stored, computed });
        }
        let barrier = u64::from_be_bytes(barrier);
        Ok(Some(Envelope {
            seq: u64::from_be_bytes(seq),
            barrier: (barrier != NONE).then_some(barrier),
        }))
    }
}

/// Whether `frame` is a barrier (see the module docs).
pub fn is_barrier(frame: &Frame) -> bool {
    matches!(
        frame,
        Frame::Hello(_)
            | Frame::HelloRefused { .. }
            | Frame::StateUpdate { .. }
            | Frame::Flush { .. }
            | Frame::SyncBits { .. }
            | Frame::SyncDone { .. }
            | Frame::Generation { .. }
            | Frame::Grow { .. }
            | Frame::GrowReply { .. }
    )
}

/// The lane for `frame`: `None` for the control lane, `Some(i)` for bulk
/// lane `i < bulk_lanes`. `next_bulk` rotates the bulk lanes. With
/// `single_lane` (dual-primary) or no bulk lanes everything is on control.
pub fn choose_lane(
    frame: &Frame,
    single_lane: bool,
    bulk_lanes: usize,
    next_bulk: &mut usize,
) -> Option<usize> {
    match frame {
        Frame::Write { data, .. }
        | Frame::ResyncData { data, .. }
        | Frame::ReadReply { data, .. }
            if !single_lane && bulk_lanes > 0 && data.len() >= BULK_MIN =>
        {
            let lane = *next_bulk % bulk_lanes;
            *next_bulk = next_bulk.wrapping_add(1);
            Some(lane)
        }
        _ => None,
    }
}

/// The sending side: stamps frames in send order.
#[derive(Debug, Default)]
pub struct Sequencer {
    next: u64,
    last_barrier: Option<u64>,
}

impl Sequencer {
    /// A sequencer for a new connection.
    pub fn new() -> Sequencer {
        Sequencer::default()
    }

    /// The envelope for the next frame sent.
    pub fn stamp(&mut self, frame: &Frame) -> Envelope {
        let env = Envelope {
            seq: self.next,
            barrier: self.last_barrier,
        };
        if is_barrier(frame) {
            self.last_barrier = Some(self.next);
        }
        self.next += 1;
        env
    }
}

/// The receiving side: releases frames in an order the rules allow.
#[derive(Debug, Default)]
pub struct Reorder {
    /// Every sequence number below this was delivered.
    low: u64,
    /// Delivered sequence numbers at or above `low`.
    delivered: BTreeSet<u64>,
    /// Received and not delivered (for duplicate detection).
    held: BTreeSet<u64>,
    /// Free frames waiting for their barrier, by barrier.
    waiting: BTreeMap<u64, Vec<(u64, Frame)>>,
    /// Barriers waiting for every earlier frame, in sequence order.
    barriers: VecDeque<(u64, Frame)>,
}

impl Reorder {
    /// A reorder buffer for a new connection.
    pub fn new() -> Reorder {
        Reorder::default()
    }

    /// Frames received but not yet delivered.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn seen(&self, seq: u64) -> bool {
        seq < self.low || self.delivered.contains(&seq) || self.held.contains(&seq)
    }

    fn done(&self, seq: u64) -> bool {
        seq < self.low || self.delivered.contains(&seq)
    }

    fn deliver(&mut self, seq: u64, frame: Frame, out: &mut Vec<Frame>) {
        self.held.remove(&seq);
        out.push(frame);
        if seq == self.low {
            self.low += 1;
            while self.delivered.remove(&self.low) {
                self.low += 1;
            }
        } else {
            self.delivered.insert(seq);
        }
        if let Some(free) = self.waiting.remove(&seq) {
            for (s, f) in free {
                self.deliver(s, f, out);
            }
        }
    }

    /// Takes a frame received on any lane (`on_control`: the control lane)
    /// and appends to `out` every frame that may now go to the replica, in
    /// the order to hand them over.
    pub fn push(
        &mut self,
        env: Envelope,
        frame: Frame,
        on_control: bool,
        out: &mut Vec<Frame>,
    ) -> Result<(), LaneError> {
        if self.seen(env.seq) {
            return Err(LaneError::Duplicate(env.seq));
        }
        if let Some(b) = env.barrier {
            if b >= env.seq {
                return Err(LaneError::BadBarrier {
                    seq: env.seq,
                    barrier: b,
                });
            }
        }
        if self.held.len() >= MAX_HELD {
            return Err(LaneError::TooManyHeld);
        }
        let barrier = is_barrier(&frame);
        if barrier && !on_control {
            return Err(LaneError::WrongLane(env.seq));
        }
        self.held.insert(env.seq);
        if barrier {
            // The control lane is ordered, so barriers arrive in order.
            if self.barriers.back().is_some_and(|(s, _)| *s > env.seq) {
                return Err(LaneError::WrongLane(env.seq));
            }
            self.barriers.push_back((env.seq, frame));
        } else {
            match env.barrier {
                Some(b) if !self.done(b) => {
                    self.waiting.entry(b).or_default().push((env.seq, frame))
                }
                _ => self.deliver(env.seq, frame, out),
            }
        }
        while self.barriers.front().is_some_and(|(s, _)| *s == self.low) {
            if let Some((s, f)) = self.barriers.pop_front() {
                self.deliver(s, f, out);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn write(id: u64, len: usize) -> Frame {
        Frame::Write {
            id,
            offset: id * 1_048_576,
            fua: false,
            data: Bytes::from(vec![0u8; len]),
        }
    }

    fn id(f: &Frame) -> u64 {
        match f {
            Frame::Write { id, .. } | Frame::Flush { id } | Frame::Ack { id, .. } => *id,
            Frame::Ping { nonce } => *nonce,
            _ => u64::MAX,
        }
    }

    #[test]
    fn envelope_round_trips_and_checks_its_crc() {
        for env in [
            Envelope {
                seq: 0,
                barrier: None,
            },
            Envelope {
                seq: 7,
                barrier: Some(3),
            },
        ] {
            let mut b = Vec::new();
            env.encode(&mut b);
            assert_eq!(b.len(), ENVELOPE_LEN);
            assert_eq!(Envelope::decode(&b), Ok(Some(env)));
            assert_eq!(Envelope::decode(&b[..ENVELOPE_LEN - 1]), Ok(None));
            b[3] ^= 1;
            assert!(matches!(
                Envelope::decode(&b),
                Err(LaneError::Checksum { .. })
            ));
        }
    }

    #[test]
    fn large_writes_go_to_bulk_lanes_except_in_single_lane_mode() {
        let mut rr = 0;
        assert_eq!(choose_lane(&write(1, 4096), false, 4, &mut rr), None);
        assert_eq!(choose_lane(&write(1, BULK_MIN), false, 4, &mut rr), Some(0));
        assert_eq!(choose_lane(&write(2, BULK_MIN), false, 4, &mut rr), Some(1));
        assert_eq!(choose_lane(&write(3, BULK_MIN), true, 4, &mut rr), None);
        assert_eq!(choose_lane(&write(3, BULK_MIN), false, 0, &mut rr), None);
        assert_eq!(
            choose_lane(&Frame::Flush { id: 1 }, false, 4, &mut rr),
            None
        );
        // Large read replies (R23) too.
        let reply = |n: usize| Frame::ReadReply {
            id: 1,
            status: 0,
            data: bytes::Bytes::from(vec![0u8; n]),
        };
        assert_eq!(choose_lane(&reply(BULK_MIN), false, 4, &mut rr), Some(2));
        assert_eq!(choose_lane(&reply(4096), false, 4, &mut rr), None);
    }

    #[test]
    fn a_small_write_overtakes_a_large_one_but_not_a_flush() {
        let mut s = Sequencer::new();
        let mut r = Reorder::new();
        let big = write(1, BULK_MIN);
        let small = write(2, 4096);
        let flush = Frame::Flush { id: 3 };
        let after = write(4, 4096);
        let (eb, es, ef, ea) = (
            s.stamp(&big),
            s.stamp(&small),
            s.stamp(&flush),
            s.stamp(&after),
        );
        let mut out = Vec::new();
        // The small write, the flush and the write after it arrive first.
        r.push(es, small, true, &mut out).unwrap();
        assert_eq!(out.iter().map(id).collect::<Vec<_>>(), [2]);
        r.push(ef, flush, true, &mut out).unwrap();
        r.push(ea, after, true, &mut out).unwrap();
        assert_eq!(
            out.len(),
            1,
            "flush and later frames wait for the big write"
        );
        r.push(eb, big, false, &mut out).unwrap();
        assert_eq!(out.iter().map(id).collect::<Vec<_>>(), [2, 1, 3, 4]);
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn protocol_violations_are_errors() {
        let mut r = Reorder::new();
        let mut out = Vec::new();
        let e = Envelope {
            seq: 0,
            barrier: None,
        };
        r.push(e, write(1, 1), true, &mut out).unwrap();
        assert_eq!(
            r.push(e, write(1, 1), true, &mut out),
            Err(LaneError::Duplicate(0))
        );
        assert!(matches!(
            r.push(
                Envelope {
                    seq: 5,
                    barrier: Some(5)
                },
                write(1, 1),
                true,
                &mut out
            ),
            Err(LaneError::BadBarrier { .. })
        ));
        assert_eq!(
            r.push(
                Envelope {
                    seq: 6,
                    barrier: None
                },
                Frame::Flush { id: 1 },
                false,
                &mut out
            ),
            Err(LaneError::WrongLane(6))
        );
    }

    /// Frame kinds for the property test: 0 = barrier (flush), 1 = small
    /// free frame (control lane), 2 = bulk write (some bulk lane).
    fn frames(kinds: &[u8]) -> Vec<Frame> {
        kinds
            .iter()
            .enumerate()
            .map(|(i, k)| match k % 3 {
                0 => Frame::Flush { id: i as u64 },
                1 => Frame::Ack {
                    id: i as u64,
                    status: 0,
                },
                _ => write(i as u64, BULK_MIN),
            })
            .collect()
    }

    proptest! {
        /// Whatever the interleaving of the lanes (each lane in order), every
        /// frame is delivered exactly once, a barrier after everything sent
        /// before it, and everything sent after a barrier after it.
        #[test]
        fn any_lane_interleaving_keeps_barriers(
            kinds in proptest::collection::vec(0u8..3, 1..60),
            picks in proptest::collection::vec(0usize..8, 0..400),
        ) {
            let fs = frames(&kinds);
            let mut s = Sequencer::new();
            let mut rr = 0;
            let mut lanes: Vec<VecDeque<(Envelope, Frame)>> = vec![VecDeque::new(); 1 + BULK_LANES];
            for f in &fs {
                let env = s.stamp(f);
                let lane = choose_lane(f, false, BULK_LANES, &mut rr).map_or(0, |l| l + 1);
                lanes[lane].push_back((env, f.clone()));
            }
            let mut r = Reorder::new();
            let mut out = Vec::new();
            let mut picks = picks.into_iter();
            while lanes.iter().any(|l| !l.is_empty()) {
                let nonempty: Vec<usize> = (0..lanes.len()).filter(|&i| !lanes[i].is_empty()).collect();
                let lane = nonempty[picks.next().unwrap_or(0) % nonempty.len()];
                let (env, f) = lanes[lane].pop_front().unwrap();
                r.push(env, f, lane == 0, &mut out).unwrap();
            }
            prop_assert_eq!(out.len(), fs.len());
            prop_assert_eq!(r.held(), 0);
            let pos: Vec<usize> = (0..fs.len())
                .map(|i| out.iter().position(|f| id(f) == i as u64).unwrap())
                .collect();
            for (i, f) in fs.iter().enumerate() {
                if is_barrier(f) {
                    for j in 0..fs.len() {
                        if j < i { prop_assert!(pos[j] < pos[i], "frame {} after barrier {}", j, i); }
                        if j > i { prop_assert!(pos[j] > pos[i], "frame {} before barrier {}", j, i); }
                    }
                }
            }
        }
    }
}
