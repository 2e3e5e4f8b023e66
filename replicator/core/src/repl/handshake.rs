//! Connection setup (Hello / HelloRefused), state updates and keepalives.

use super::frame::{Frame, Hello};
use super::replica::Replica;
use super::state::{ConnState, DiskState, Role};
use super::sync::{decide, Decision, View};
use super::{Event, PeerId};

impl Replica {
    fn hello(&self, peer: PeerId) -> Frame {
        Frame::Hello(Hello {
            protocol_version: self.cfg.protocol_version,
            volume_uuid: self.cfg.volume_uuid,
            node_name: self.cfg.node_name.clone(),
            volume_size: self.cfg.size,
            block_size: self.cfg.block_size,
            role: self.role,
            disk: self.disk,
            gens: self.hello_gens(peer),
        })
    }

    pub(crate) fn on_peer_connected(&mut self, peer: PeerId) {
        if self.peer(peer).is_none() {
            return;
        }
        // A new transport replaces whatever the old one was.
        self.peer_lost(peer);
        let now = self.now;
        let keepalive = self.cfg.keepalive_interval;
        let p = &mut self.peers[peer.0 as usize];
        p.conn = ConnState::Connecting;
        p.epoch += 1;
        p.role = None;
        p.disk = None;
        p.last_rx = now;
        p.next_ping = now + keepalive;
        self.event(Event::PeerConnState {
            peer,
            state: ConnState::Connecting,
        });
        let h = self.hello(peer);
        if let Frame::Hello(sent) = &h {
            self.peers[peer.0 as usize].hello_sent = Some((sent.gens, self.role, self.disk));
        }
        self.send(peer, h);
    }

    pub(crate) fn on_peer_frame(&mut self, peer: PeerId, frame: Frame) {
        let Some(p) = self.peer(peer) else { return };
        let conn = p.conn;
        if conn == ConnState::StandAlone {
            return; // Leftover of a connection already given up.
        }
        self.peers[peer.0 as usize].last_rx = self.now;
        match frame {
            Frame::Hello(h) if conn == ConnState::Connecting => self.on_hello(peer, h),
            Frame::HelloRefused { reason } => {
                self.event(Event::HandshakeRefused {
                    peer,
                    reason: reason.clone(),
                    by_us: false,
                });
                self.disconnect(peer, format!("peer refused the handshake: {reason}"));
            }
            _ if conn == ConnState::Connecting => {
                self.violation(peer, "frame before the handshake completed")
            }
            Frame::Hello(_) => self.violation(peer, "second Hello"),
            Frame::Ping { nonce } => self.send(peer, Frame::Pong { nonce }),
            Frame::Pong { .. } => {}
            Frame::StateUpdate {
                role,
                disk,
                peer_outdated,
            } => self.on_state_update(peer, role, disk, peer_outdated),
            Frame::Ack { id, status } => self.on_ack(peer, id, status),
            data @ (Frame::Write { .. }
            | Frame::Trim { .. }
            | Frame::WriteZeroes { .. }
            | Frame::Flush { .. }) => self.on_peer_data(peer, data),
            Frame::SyncBits { ranges, last } => self.on_sync_bits(peer, ranges, last),
            data @ (Frame::ResyncData { .. }
            | Frame::ResyncZeroes { .. }
            | Frame::SyncDone { .. }) => self.on_resync_frame(peer, data),
            Frame::ResyncAck { id, status } => self.on_resync_ack(peer, id, status),
            Frame::Generation { current, history } => self.on_generation(peer, current, history),
            Frame::VerifyRequest { id, offset, len } => {
                self.on_verify_request(peer, id, offset, len)
            }
            Frame::VerifyReply {
                id,
                status,
                digests,
            } => self.on_verify_reply(peer, id, status, digests),
            Frame::ReadRequest { id, offset, len } => self.on_read_request(peer, id, offset, len),
            Frame::ReadReply { id, status, data } => self.on_read_reply(peer, id, status, data),
            Frame::ResyncDigestRequest { id, offset, len } => {
                self.on_resync_digest_request(peer, id, offset, len)
            }
            Frame::ResyncDigestReply {
                id,
                status,
                digests,
            } => self.on_resync_digest_reply(peer, id, status, digests),
            Frame::Grow { size } => self.on_grow_request(peer, size),
            Frame::GrowReply { size, error } => self.on_grow_reply(peer, size, error),
        }
    }

    pub(crate) fn violation(&mut self, peer: PeerId, what: &'static str) {
        self.event(Event::ProtocolViolation { peer, what });
        self.disconnect(peer, format!("protocol violation: {what}"));
    }

    fn refuse(&mut self, peer: PeerId, reason: String) {
        self.event(Event::HandshakeRefused {
            peer,
            reason: reason.clone(),
            by_us: true,
        });
        self.send(
            peer,
            Frame::HelloRefused {
                reason: reason.clone(),
            },
        );
        self.disconnect(peer, reason);
    }

    /// Counts connected Primary peers other than `except`.
    fn primary_peers(&self, except: PeerId) -> usize {
        self.peers
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                *i != except.0 as usize
                    && p.conn == ConnState::Connected
                    && p.role == Some(Role::Primary)
            })
            .count()
    }

    fn on_hello(&mut self, peer: PeerId, h: Hello) {
        let cfg = &self.cfg;
        let expected = &self.peers[peer.0 as usize].name;
        let refusal = if h.protocol_version != cfg.protocol_version {
            Some(format!(
                "protocol version mismatch: peer speaks {}, this node {}",
                h.protocol_version, cfg.protocol_version
            ))
        } else if h.volume_uuid != cfg.volume_uuid {
            Some("volume uuid mismatch: the peer holds another volume".to_owned())
        } else if h.node_name != *expected {
            Some(format!(
                "unexpected node name {:?} (expected {expected:?})",
                h.node_name
            ))
        } else if let Some(why) = self.grow_refuses_handshake() {
            Some(why)
        } else if h.volume_size != cfg.size {
            Some(format!(
                "volume size mismatch: peer {} bytes, this node {}; grow the smaller replica to {} bytes (`tandemctl resize`)",
                h.volume_size,
                cfg.size,
                h.volume_size.max(cfg.size)
            ))
        } else if h.block_size != cfg.block_size {
            Some(format!(
                "block size mismatch: peer {}, this node {}",
                h.block_size, cfg.block_size
            ))
        } else if h.gens.chunk != cfg.bitmap_chunk
            && self.disk != DiskState::Diskless
            && h.disk != DiskState::Diskless
        {
            // (No bitmap is exchanged with a Diskless side, R23/R28.)
            Some(format!(
                "bitmap chunk mismatch: peer {} bytes per bit, this node {}",
                h.gens.chunk, cfg.bitmap_chunk
            ))
        } else {
            None
        };
        if let Some(r) = refusal {
            return self.refuse(peer, r);
        }
        if h.role == Role::Primary {
            let primaries = 1 + self.primary_peers(peer) + usize::from(self.role == Role::Primary);
            if primaries > 1 && !self.cfg.allow_two_primaries {
                self.event(Event::SplitRoleRefused { peer });
                return self.refuse(
                    peer,
                    "both nodes are Primary and allow_two_primaries is off".into(),
                );
            }
            if primaries > 2 {
                self.event(Event::SplitRoleRefused { peer });
                return self.refuse(peer, "more than two Primaries".into());
            }
        }
        // Decide from what each side put in its Hello. New writes were
        // frozen meanwhile, but a lost peer may have moved the generation:
        // then start over.
        let Some((mine, my_role, my_disk)) = self.peers[peer.0 as usize].hello_sent else {
            return self.violation(peer, "Hello before this node sent its own");
        };
        if mine != self.hello_gens(peer) || (my_role, my_disk) != (self.role, self.disk) {
            return self.disconnect(
                peer,
                "state changed during the handshake; reconnecting".into(),
            );
        }
        if self.disk == DiskState::Diskless || h.disk == DiskState::Diskless {
            // R23: a detached side neither gives nor takes a resync.
            return self.diskless_handshake(peer, &h);
        }
        let me = View {
            gens: mine,
            role: my_role,
            disk: my_disk,
            name: &self.cfg.node_name,
        };
        let them = View {
            gens: h.gens,
            role: h.role,
            disk: h.disk,
            name: &h.node_name,
        };
        let decision = decide(&me, &them);
        let refusal = match decision {
            Decision::SplitBrain => {
                self.peers[peer.0 as usize].split_brain = true;
                self.event(Event::SplitBrain { peer });
                Some(format!(
                    "split brain: both sides wrote while disconnected (this node: generation {:016x}, from {:016x}; peer: {:016x}, from {:016x}); resolve by discarding one side's data",
                    mine.current, mine.bitmap_gen, h.gens.current, h.gens.bitmap_gen
                ))
            }
            Decision::Unrelated => Some(format!(
                "unrelated data: no generation in common (this node {:016x}, peer {:016x})",
                mine.current, h.gens.current
            )),
            Decision::NoUpToDate => {
                Some("the side that would have to be the sync source is not UpToDate".to_owned())
            }
            Decision::TargetIsPrimary => Some(
                "the side that would have to be the sync target is Primary; demote it first"
                    .to_owned(),
            ),
            _ => None,
        };
        if let Some(r) = refusal {
            return self.refuse(peer, r);
        }
        let p = &mut self.peers[peer.0 as usize];
        p.split_brain = false;
        p.sync_deferred = false;
        p.gen_unconfirmed.clear();
        if decision == Decision::InSync {
            p.confirmed_gen = mine.current;
        }
        p.conn = ConnState::Connected;
        p.role = Some(h.role);
        p.disk = Some(h.disk);
        self.event(Event::PeerConnState {
            peer,
            state: ConnState::Connected,
        });
        self.event(Event::PeerStateChanged {
            peer,
            role: h.role,
            disk: h.disk,
        });
        // Completes the handshake from this side: re-state own role and disk.
        let f = self.state_update_for(peer);
        self.send(peer, f);
        self.start_sync(peer, decision, &h.gens);
    }

    fn on_state_update(&mut self, peer: PeerId, role: Role, disk: DiskState, _peer_outdated: bool) {
        let p = &mut self.peers[peer.0 as usize];
        let changed = p.role != Some(role) || p.disk != Some(disk);
        let fell_behind = p.disk == Some(DiskState::UpToDate)
            && disk != DiskState::UpToDate
            && matches!(p.sync, super::peer::PeerSync::None);
        p.role = Some(role);
        p.disk = Some(disk);
        if disk == DiskState::Diskless {
            // R23: its disk failed; which generation it holds is unknown.
            p.confirmed_gen = 0;
        }
        if changed {
            self.event(Event::PeerStateChanged { peer, role, disk });
        }
        if role == Role::Primary && self.role == Role::Primary {
            let primaries = 2 + self.primary_peers(peer);
            if !self.cfg.allow_two_primaries || primaries > 2 {
                self.event(Event::SplitRoleRefused { peer });
                return self.disconnect(peer, "both nodes are Primary".into());
            }
        }
        if disk == DiskState::UpToDate {
            self.on_peer_up_to_date(peer);
        }
        if fell_behind && self.role == Role::Primary && self.disk == DiskState::UpToDate {
            // It missed something (a failed write, or it learned it is
            // behind): a new handshake decides the resync.
            self.disconnect(
                peer,
                format!("peer's disk became {disk:?}; reconnecting to resync it"),
            );
        }
    }
}
