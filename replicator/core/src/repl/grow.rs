//! Online growth of a replicated volume (`docs/replication.md`, R29).
//!
//! One node coordinates: the one asked to grow ([`Replica::grow`]), which
//! must be the Primary when a Primary is connected. It asks every connected
//! peer to grow first ([`Frame::Grow`]); each grows its disk (an
//! [`Output::Grow`] for its driver) and its state, then answers
//! ([`Frame::GrowReply`]). Once every peer answered (or was lost) the
//! coordinator grows its own disk and only then its size: frontend writes
//! past the old end are accepted from that moment, when every connected
//! peer already has the room. If a connected peer answers that it could
//! not grow, the coordinator does not grow (redundancy is worth more than
//! the room): the growth fails naming the peer, and peers that did grow
//! stay larger until a retry completes it. A peer lost meanwhile does not
//! stop it; it connects again (the handshake compares sizes) once it has
//! the same size. While a growth runs no handshake completes and no bitmap
//! page is written (slots may move on disk).

use super::frame::Frame;
use super::peer::PeerSet;
use super::replica::Replica;
use super::state::{ConnState, Role};
use super::{Event, Output, PeerId, Time};
use crate::meta::Layout;

/// Why [`Replica::grow`] refused to start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrowError {
    /// Volumes never shrink.
    #[error("the volume is {size} bytes; it cannot shrink to {new_size}")]
    Shrink {
        /// Current size.
        size: u64,
        /// Asked for.
        new_size: u64,
    },
    /// Not a multiple of the block size.
    #[error("{new_size} is not a multiple of the block size {block_size}")]
    Unaligned {
        /// Asked for.
        new_size: u64,
        /// Block size.
        block_size: u32,
    },
    /// Another growth is running.
    #[error("a growth to {0} bytes is in progress; retry when it finished")]
    InProgress(u64),
    /// A connected peer is Primary: it coordinates growth.
    #[error("peer {0} is Primary: grow the volume there")]
    PeerIsPrimary(String),
    /// The bitmap slots would move on disk while one holds out-of-sync
    /// marks.
    #[error("growing to {new_size} bytes moves the bitmap slots on disk, and peer {peer}'s bitmap records regions out of sync: let it resync first (or grow less: up to {max_same_layout} bytes keeps the layout)")]
    BitmapInUse {
        /// Asked for.
        new_size: u64,
        /// The peer whose bitmap has set bits.
        peer: String,
        /// The largest size with the same bitmap layout.
        max_same_layout: u64,
    },
}

/// Where this node is in a growth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LocalStep {
    /// Coordinator: waiting for the peers' answers.
    AskingPeers,
    /// Waiting for bitmap page writes in flight to finish.
    Ready,
    /// [`Output::Grow`] issued, waiting for [`Replica::grown`].
    Issued,
}

/// A growth in progress.
#[derive(Debug, Clone)]
pub(crate) struct Growth {
    pub(crate) size: u64,
    pub(crate) from: u64,
    /// The peer that asked (with its connection epoch); `None`: this node
    /// coordinates.
    pub(crate) origin: Option<(PeerId, u64)>,
    /// Coordinator: peers asked and not answered.
    pub(crate) waiting: PeerSet,
    /// Coordinator: peers that answered they could not grow, and why.
    pub(crate) failed: Vec<(PeerId, String)>,
    /// Coordinator: peers lost before they answered.
    pub(crate) lost: Vec<PeerId>,
    pub(crate) step: LocalStep,
}

/// Bytes of one bitmap slot for `size` bytes at `chunk` bytes per bit.
fn slot_bytes(size: u64, chunk: u32) -> u64 {
    Layout::new(size, chunk, u64::MAX).map_or(0, |l| l.slot_bytes)
}

impl Replica {
    /// The volume size in force (bytes).
    pub fn size(&self) -> u64 {
        self.cfg.size
    }

    /// The size a growth in progress goes to, if one runs.
    pub fn growing(&self) -> Option<u64> {
        self.growth.as_ref().map(|g| g.size)
    }

    /// Starts growing the volume to `size` bytes on every connected replica
    /// (R29). The outcome comes as [`Event::GrowFinished`] with
    /// `coordinator: true`; `Ok(false)`: the volume already has that size
    /// (nothing to do, no event).
    pub fn grow(&mut self, now: Time, size: u64) -> Result<bool, GrowError> {
        self.now = self.now.max(now);
        if let Some(g) = &self.growth {
            return Err(GrowError::InProgress(g.size));
        }
        if size == self.cfg.size {
            // Connected peers have this size too: they had ours at the
            // handshake and grow only when asked by a coordinator.
            return Ok(false);
        }
        self.grow_check(size, None)?;
        let mut waiting = PeerSet::default();
        for i in 0..self.peers.len() {
            if self.peers[i].conn == ConnState::Connected {
                let id = PeerId(i as u8);
                waiting.insert(id);
                self.send(id, Frame::Grow { size });
            }
        }
        // Peers that already have `size` (a retry after a failed growth)
        // answer at once.
        self.growth = Some(Growth {
            size,
            from: self.cfg.size,
            origin: None,
            waiting,
            failed: Vec::new(),
            lost: Vec::new(),
            step: LocalStep::AskingPeers,
        });
        self.progress();
        Ok(true)
    }

    /// Whether this node may grow to `size` (`asked_by`: the peer asking).
    fn grow_check(&self, size: u64, asked_by: Option<PeerId>) -> Result<(), GrowError> {
        if size < self.cfg.size {
            return Err(GrowError::Shrink {
                size: self.cfg.size,
                new_size: size,
            });
        }
        if size % u64::from(self.cfg.block_size) != 0 {
            return Err(GrowError::Unaligned {
                new_size: size,
                block_size: self.cfg.block_size,
            });
        }
        match asked_by {
            None => {
                if self.role != Role::Primary {
                    if let Some(p) = self
                        .peers
                        .iter()
                        .find(|p| p.conn == ConnState::Connected && p.role == Some(Role::Primary))
                    {
                        return Err(GrowError::PeerIsPrimary(p.name.clone()));
                    }
                }
            }
            Some(by) => {
                // Only a Primary coordinates while one is connected; a
                // Primary takes orders from no one but another Primary.
                let asker_primary = self.peers[by.0 as usize].role == Some(Role::Primary);
                if self.role == Role::Primary && !asker_primary {
                    return Err(GrowError::PeerIsPrimary(self.cfg.node_name.clone()));
                }
            }
        }
        let chunk = self.cfg.bitmap_chunk;
        if slot_bytes(self.cfg.size, chunk) != slot_bytes(size, chunk) {
            if let Some(i) = (0..self.bitmaps.len()).find(|i| self.bitmaps[*i].count() > 0) {
                let keep = slot_bytes(self.cfg.size, chunk) * 8 * u64::from(chunk);
                let max_same_layout = keep - keep % u64::from(self.cfg.block_size);
                return Err(GrowError::BitmapInUse {
                    new_size: size,
                    peer: self.cfg.peers[i].clone(),
                    max_same_layout,
                });
            }
        }
        Ok(())
    }

    /// A peer asks this node to grow.
    pub(crate) fn on_grow_request(&mut self, peer: PeerId, size: u64) {
        let reply = |error: String| Frame::GrowReply { size, error };
        if let Some(g) = &self.growth {
            let f = reply(GrowError::InProgress(g.size).to_string());
            return self.send(peer, f);
        }
        if size == self.cfg.size {
            return self.send(peer, reply(String::new()));
        }
        if let Err(e) = self.grow_check(size, Some(peer)) {
            return self.send(peer, reply(e.to_string()));
        }
        let epoch = self.peers[peer.0 as usize].epoch;
        self.growth = Some(Growth {
            size,
            from: self.cfg.size,
            origin: Some((peer, epoch)),
            waiting: PeerSet::default(),
            failed: Vec::new(),
            lost: Vec::new(),
            step: LocalStep::Ready,
        });
    }

    /// A peer answers this node's [`Frame::Grow`].
    pub(crate) fn on_grow_reply(&mut self, peer: PeerId, size: u64, error: String) {
        let Some(g) = self.growth.as_mut() else {
            return; // A late answer (this node already gave up on it).
        };
        if g.origin.is_some() || g.size != size || !g.waiting.remove(peer) {
            return;
        }
        if !error.is_empty() {
            g.failed.push((peer, error));
        }
    }

    /// The connection to `peer` is gone (hook of `peer_lost`).
    pub(crate) fn grow_peer_lost(&mut self, peer: PeerId) {
        if let Some(g) = self.growth.as_mut() {
            if g.origin.is_none() && g.waiting.remove(peer) {
                g.lost.push(peer);
            }
        }
    }

    /// No handshake completes while a growth runs.
    pub(crate) fn grow_refuses_handshake(&self) -> Option<String> {
        self.growth
            .as_ref()
            .map(|g| format!("the volume is growing to {} bytes; retry", g.size))
    }

    /// Bitmap pages are not written while a growth runs (their place on
    /// disk may move).
    pub(crate) fn grow_holds_pages(&self) -> bool {
        self.growth.is_some()
    }

    /// Moves a growth on; part of `progress`.
    pub(crate) fn grow_progress(&mut self) -> bool {
        let Some(g) = self.growth.as_mut() else {
            return false;
        };
        if g.step == LocalStep::AskingPeers && g.waiting.is_empty() {
            if !g.failed.is_empty() {
                // A connected peer cannot take the new size: keep ours.
                let Some(g) = self.growth.take() else {
                    return false;
                };
                let why: Vec<String> = g
                    .failed
                    .iter()
                    .map(|(p, e)| {
                        format!("peer {} could not grow: {e}", self.cfg.peers[p.0 as usize])
                    })
                    .collect();
                self.finish_growth(g, Err(why.join("; ")));
                return true;
            }
            g.step = LocalStep::Ready;
        }
        if g.step == LocalStep::Ready && !self.mt.page_in_flight() {
            g.step = LocalStep::Issued;
            let size = g.size;
            self.out.push_back(Output::Grow { size });
            return true;
        }
        false
    }

    /// The driver finished an [`Output::Grow`]: `Ok` once the local disk
    /// has `size` bytes durably (a diskless client has nothing to grow).
    pub fn grown(&mut self, now: Time, size: u64, result: Result<(), String>) {
        self.now = self.now.max(now);
        let Some(g) = self
            .growth
            .take_if(|g| g.size == size && g.step == LocalStep::Issued)
        else {
            return;
        };
        self.finish_growth(g, result);
        self.progress();
    }

    fn finish_growth(&mut self, g: Growth, result: Result<(), String>) {
        let size = g.size;
        if result.is_ok() {
            self.cfg.size = size;
            for b in &mut self.bitmaps {
                b.grow(size);
            }
            for p in &mut self.peers {
                p.unflushed.cur.grow(size);
                for (_, b) in &mut p.unflushed.pending {
                    b.grow(size);
                }
                if let Some(b) = &mut p.lost_unflushed {
                    b.grow(size);
                }
            }
            // Bitmap pages marked while the growth ran were held back; they
            // are written now, where the new layout puts them.
        }
        if let Some((peer, epoch)) = g.origin {
            let p = &self.peers[peer.0 as usize];
            if p.conn == ConnState::Connected && p.epoch == epoch {
                let error = result.clone().err().unwrap_or_default();
                self.send(peer, Frame::GrowReply { size, error });
            }
        }
        let not_grown = g
            .lost
            .iter()
            .map(|p| {
                (
                    self.cfg.peers[p.0 as usize].clone(),
                    "connection lost before it answered".to_owned(),
                )
            })
            .collect();
        self.event(Event::GrowFinished {
            from: g.from,
            size,
            coordinator: g.origin.is_none(),
            result,
            failed: not_grown,
        });
    }
}
