//! Quorum with a witness, sans-IO (`docs/replication.md`, R25).
//!
//! * [`Arbiter`] is the witness's decision logic: at most one node per
//!   volume (the *holder*) may complete writes a peer did not get; the
//!   nodes that missed such writes are *outdated* and never granted
//!   anything until the holder releases them after their resync; a
//!   takeover is granted only while no other node of the volume is
//!   connected to the witness as Primary. The durable part of its state
//!   ([`Arbiter::volumes`]) must be persisted by the caller before the
//!   answer is sent: [`Arbiter::handle`] says when it changed, and
//!   [`Arbiter::revert`] turns a grant into a denial when persisting failed.
//! * [`QuorumCtl`] is the replica driver's side: it reports the node's
//!   state, asks for a grant while writes are held, asks to take over once
//!   its Primary has been gone for the failover timeout, stands down when
//!   the witness says it is outdated, and releases the grant once every
//!   peer is back in sync. Messages to the witness and notes for the log
//!   come out of [`QuorumCtl::poll`].
//!
//! The daemon (`tandemd witness`, the witness client) and the simulator
//! both drive these types; neither reads a clock here.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use crate::repl::{errno, ConnState, DiskState, PeerId, ReplState, Replica, Role, Time};

/// A message from a replica to the witness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToWitness {
    /// The node's state for a volume.
    Report {
        /// Volume key.
        volume: String,
        /// The node is Primary.
        primary: bool,
        /// Own disk state (informational).
        disk: String,
        /// Peers this node is not replicating to.
        lagging: Vec<String>,
    },
    /// Asks to complete writes that `lagging` peers do not get.
    Solo {
        /// Volume key.
        volume: String,
        /// Take over as Primary (failover) rather than continue as one.
        promote: bool,
        /// Peers this node is not replicating to.
        lagging: Vec<String>,
    },
    /// Every peer is back in sync: the grant is returned.
    Release {
        /// Volume key.
        volume: String,
    },
}

impl ToWitness {
    /// The volume the message is about.
    pub fn volume(&self) -> &str {
        match self {
            ToWitness::Report { volume, .. }
            | ToWitness::Solo { volume, .. }
            | ToWitness::Release { volume } => volume,
        }
    }
}

/// Which message a verdict answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answers {
    /// A `Report`.
    Report,
    /// A `Solo`.
    Solo,
    /// A `Release`.
    Release,
}

/// The witness's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Volume key.
    pub volume: String,
    /// What it answers.
    pub answers: Answers,
    /// For `Solo`: whether it asked to take over.
    pub promote: bool,
    /// For `Solo` and `Release`: granted.
    pub granted: bool,
    /// The node allowed to write alone, if any.
    pub holder: Option<String>,
    /// The asking node missed writes: it may not write or be promoted
    /// until resynced.
    pub outdated: bool,
    /// Why (for logs).
    pub reason: String,
}

/// Durable arbitration state of one volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeState {
    /// The node allowed to write alone.
    pub holder: Option<String>,
    /// Nodes that missed writes the holder acknowledged alone.
    pub outdated: BTreeSet<String>,
}

/// A node connected to the witness, as it last reported.
#[derive(Debug, Clone)]
struct Live {
    conn: u64,
    primary: bool,
}

/// The witness's decisions. Durable state: [`Arbiter::volumes`]; the set
/// of connected nodes is not durable.
#[derive(Debug, Default)]
pub struct Arbiter {
    volumes: BTreeMap<String, VolumeState>,
    live: HashMap<(String, String), Live>,
}

/// The durable state before a change, to undo it ([`Arbiter::revert`]).
#[derive(Debug)]
pub struct Undo {
    volume: String,
    old: Option<VolumeState>,
}

impl Arbiter {
    /// An arbiter with durable state `volumes` (as persisted) and no node
    /// connected.
    pub fn new(volumes: BTreeMap<String, VolumeState>) -> Arbiter {
        Arbiter {
            volumes,
            live: HashMap::new(),
        }
    }

    /// The durable state, to persist.
    pub fn volumes(&self) -> &BTreeMap<String, VolumeState> {
        &self.volumes
    }

    /// Forgets the connection `conn` (it ended).
    pub fn disconnected(&mut self, conn: u64) {
        self.live.retain(|_, l| l.conn != conn);
    }

    /// Handles one message from `node` on connection `conn`. When the
    /// durable state changed, the second value is `Some`: the caller
    /// persists [`Arbiter::volumes`] before sending the verdict and, if
    /// that fails, calls [`Arbiter::revert`] (which denies).
    pub fn handle(&mut self, node: &str, conn: u64, msg: ToWitness) -> (Verdict, Option<Undo>) {
        let volume = msg.volume().to_owned();
        let before = self.volumes.get(&volume).cloned().unwrap_or_default();
        let mut st = before.clone();
        let outdated = st.outdated.contains(node);
        let mut v = Verdict {
            volume: volume.clone(),
            answers: Answers::Report,
            promote: false,
            granted: false,
            holder: None,
            outdated,
            reason: String::new(),
        };
        match msg {
            ToWitness::Report { primary, .. } => {
                self.live
                    .insert((volume.clone(), node.to_owned()), Live { conn, primary });
                v.reason = if outdated {
                    format!(
                        "{node} missed writes {} acknowledged alone; it must be resynced",
                        st.holder.as_deref().unwrap_or("another node")
                    )
                } else {
                    "ok".into()
                };
            }
            ToWitness::Solo {
                promote, lagging, ..
            } => {
                v.answers = Answers::Solo;
                v.promote = promote;
                let other_primary = self
                    .live
                    .iter()
                    .filter(|((vol, n), l)| *vol == volume && n != node && l.primary)
                    .map(|((_, n), _)| n.clone())
                    .min();
                let refusal = if outdated {
                    Some(format!("{node} is outdated: it missed writes"))
                } else if let Some(h) = st.holder.as_ref().filter(|h| *h != node) {
                    Some(format!("{h} writes alone already"))
                } else if let (true, Some(p)) = (promote, other_primary) {
                    Some(format!("{p} is Primary and still reaches the witness"))
                } else {
                    None
                };
                match refusal {
                    Some(r) => v.reason = r,
                    None => {
                        st.holder = Some(node.to_owned());
                        st.outdated
                            .extend(lagging.into_iter().filter(|n| n != node));
                        v.granted = true;
                        v.reason = format!(
                            "{node} writes alone; outdated: {:?}",
                            st.outdated.iter().collect::<Vec<_>>()
                        );
                        if promote {
                            self.live.insert(
                                (volume.clone(), node.to_owned()),
                                Live {
                                    conn,
                                    primary: true,
                                },
                            );
                        }
                    }
                }
            }
            ToWitness::Release { .. } => {
                v.answers = Answers::Release;
                if st.holder.as_deref() == Some(node) {
                    st.holder = None;
                    st.outdated.clear();
                    v.granted = true;
                    v.reason = "released: every replica in sync".into();
                } else {
                    v.reason = format!("{node} holds nothing");
                }
            }
        }
        let undo = if st != before {
            let old = self.volumes.insert(volume.clone(), st);
            Some(Undo {
                volume: volume.clone(),
                old,
            })
        } else {
            None
        };
        let st = self.volumes.get(&volume).cloned().unwrap_or_default();
        v.holder = st.holder;
        v.outdated = st.outdated.contains(node);
        (v, undo)
    }

    /// Persisting the change `undo` failed: the durable state goes back to
    /// what it was and `v` becomes a denial naming `why`.
    pub fn revert(&mut self, undo: Undo, node: &str, v: &mut Verdict, why: &str) {
        match undo.old {
            Some(o) => self.volumes.insert(undo.volume.clone(), o),
            None => self.volumes.remove(&undo.volume),
        };
        let st = self.volumes.get(&undo.volume).cloned().unwrap_or_default();
        v.granted = false;
        v.reason = format!("witness state not saved: {why}");
        v.holder = st.holder;
        v.outdated = st.outdated.contains(node);
    }
}

/// What a Primary does while writes are held and nobody grants (R25).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoQuorum {
    /// Hold them until a peer or the witness answers (default).
    #[default]
    Suspend,
    /// Fail them with EIO.
    IoError,
}

/// Something the driver should log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// No quorum: `held` writes failed with EIO.
    FailedHeld {
        /// How many.
        held: usize,
    },
    /// The Primary is gone for the failover timeout: asking to take over.
    AskingTakeover,
    /// Promoted with the witness's grant.
    FailedOver,
    /// The takeover was granted but the promotion refused.
    PromotionRefused(String),
    /// The witness denied writing alone.
    Denied(String),
    /// The witness says this node missed writes: standing down.
    StandingDown(String),
    /// Demoting after losing the arbitration failed.
    DemoteFailed(String),
}

/// What [`QuorumCtl::poll`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuorumOutput {
    /// Send this to the witness (the connection was up when it was made).
    Send(ToWitness),
    /// Log this.
    Note(Note),
}

/// Quorum facts for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumFacts {
    /// A witness is configured.
    pub witness: bool,
    /// Connected to it.
    pub witness_connected: bool,
    /// The witness says this node missed writes.
    pub outdated: bool,
    /// The node the witness lets write alone.
    pub holder: Option<String>,
    /// Writes held back waiting for a peer or a grant.
    pub held: usize,
    /// This node may complete writes its peers do not get.
    pub solo_granted: bool,
    /// Automatic promotions done by this node.
    pub failovers: u64,
}

/// How long a `solo` request is left unanswered before it is asked again.
pub const ASK_AGAIN: Duration = Duration::from_secs(1);

/// The driver's side of quorum: witness link, failover timer, freezing.
#[derive(Debug)]
pub struct QuorumCtl {
    volume: String,
    witness: bool,
    auto_failover: bool,
    failover_timeout: Duration,
    on_no_quorum: NoQuorum,
    connected: bool,
    asked: Option<Time>,
    outdated: bool,
    holder: Option<String>,
    last_report: Option<(Role, DiskState, Vec<String>)>,
    reported_at: Option<Time>,
    primary_lost_at: Option<Time>,
    had_primary: bool,
    failovers: u64,
    /// This controller set the replica's `discard_my_data` (standing down).
    set_discard: bool,
    out: VecDeque<QuorumOutput>,
}

impl QuorumCtl {
    /// `witness`: one is configured. `volume`: the key the witness knows
    /// the volume by.
    pub fn new(
        volume: String,
        witness: bool,
        auto_failover: bool,
        failover_timeout: Duration,
        on_no_quorum: NoQuorum,
    ) -> QuorumCtl {
        QuorumCtl {
            volume,
            witness,
            auto_failover,
            failover_timeout,
            on_no_quorum,
            connected: false,
            asked: None,
            outdated: false,
            holder: None,
            last_report: None,
            reported_at: None,
            primary_lost_at: None,
            had_primary: false,
            failovers: 0,
            set_discard: false,
            out: VecDeque::new(),
        }
    }

    /// Whether the driver should tick periodically.
    pub fn active(&self) -> bool {
        self.witness || self.on_no_quorum == NoQuorum::IoError
    }

    /// The witness connection is up.
    pub fn witness_up(&mut self) {
        self.connected = true;
        self.asked = None;
        self.last_report = None;
    }

    /// The witness connection is gone (messages not yet sent are dropped).
    pub fn witness_down(&mut self) {
        self.connected = false;
        self.asked = None;
        self.out.retain(|o| !matches!(o, QuorumOutput::Send(_)));
    }

    /// Connected to the witness.
    pub fn witness_connected(&self) -> bool {
        self.connected
    }

    /// The witness last said this node missed writes.
    pub fn outdated(&self) -> bool {
        self.outdated
    }

    /// Automatic promotions done by this node.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// The next message to send or note to log.
    pub fn poll(&mut self) -> Option<QuorumOutput> {
        self.out.pop_front()
    }

    /// Refuses a manual promotion the witness forbids.
    pub fn may_promote(&self) -> Result<(), String> {
        if self.outdated {
            return Err(format!(
                "the witness says this node missed writes ({} wrote alone); it must be resynced first",
                self.holder.as_deref().unwrap_or("another node")
            ));
        }
        Ok(())
    }

    /// Status facts.
    pub fn facts(&self, replica: &Replica) -> QuorumFacts {
        let q = replica.quorum();
        QuorumFacts {
            witness: self.witness,
            witness_connected: self.connected,
            outdated: self.outdated,
            holder: self.holder.clone(),
            held: q.held,
            solo_granted: q.solo_granted,
            failovers: self.failovers,
        }
    }

    fn send(&mut self, m: ToWitness) -> bool {
        if self.connected {
            self.out.push_back(QuorumOutput::Send(m));
        }
        self.connected
    }

    fn note(&mut self, n: Note) {
        self.out.push_back(QuorumOutput::Note(n));
    }

    fn peers(replica: &Replica) -> impl Iterator<Item = crate::repl::PeerStatus> + '_ {
        (0..replica.config().peers.len())
            .filter_map(|i| u8::try_from(i).ok())
            .filter_map(|i| replica.peer_status(PeerId(i)))
    }

    fn lagging(replica: &Replica) -> Vec<String> {
        replica
            .config()
            .peers
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                u8::try_from(*i)
                    .ok()
                    .and_then(|i| replica.peer_status(PeerId(i)))
                    .is_none_or(|s| {
                        !matches!(s.repl, ReplState::Established | ReplState::SyncSource)
                    })
            })
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// Acts on the replica's state: reports changes, asks for grants,
    /// releases them, fails held writes without quorum, and starts a
    /// failover once the Primary has been gone for the timeout.
    pub fn tick(&mut self, replica: &mut Replica, now: Time) {
        let role = replica.role();
        let disk = replica.disk_state();
        let lagging = Self::lagging(replica);
        // Failover timer: a Primary peer was seen and is gone.
        let primary_peer = Self::peers(replica)
            .any(|s| s.conn == ConnState::Connected && s.role == Some(Role::Primary));
        if primary_peer || role == Role::Primary {
            self.had_primary = true;
            self.primary_lost_at = None;
        } else if self.had_primary && self.primary_lost_at.is_none() {
            self.primary_lost_at = Some(now);
        }
        if self.connected {
            let report = (role, disk, lagging.clone());
            // While a peer lags, the report is repeated: the witness
            // answers only messages, and a node it marked outdated after
            // the last answer (the other side was granted meanwhile) must
            // learn it to stand down and to volunteer to discard.
            let stale =
                !lagging.is_empty() && self.reported_at.is_none_or(|t| now.since(t) >= ASK_AGAIN);
            if self.last_report.as_ref() != Some(&report) || stale {
                let m = ToWitness::Report {
                    volume: self.volume.clone(),
                    primary: role == Role::Primary,
                    disk: format!("{disk:?}"),
                    lagging: lagging.clone(),
                };
                if self.send(m) {
                    self.last_report = Some(report);
                    self.reported_at = Some(now);
                }
            }
        }
        // Standing down again: `demote` is refused while requests are in
        // flight, and those not yet done locally when the verdict came
        // are held (and failed) only now.
        if self.outdated && role == Role::Primary {
            self.stand_down(replica, now);
        }
        let role = replica.role();
        let q = replica.quorum();
        let asked_recently = self.asked.is_some_and(|t| now.since(t) < ASK_AGAIN);
        if role == Role::Primary && q.held > 0 && !q.solo_granted {
            if self.connected && !self.outdated {
                if !asked_recently {
                    let m = ToWitness::Solo {
                        volume: self.volume.clone(),
                        promote: false,
                        lagging: lagging.clone(),
                    };
                    if self.send(m) {
                        self.asked = Some(now);
                    }
                }
            } else if self.on_no_quorum == NoQuorum::IoError {
                self.note(Note::FailedHeld { held: q.held });
                replica.fail_held(now, errno::EIO);
            }
        }
        let all_established =
            lagging.is_empty() && Self::peers(replica).all(|s| s.repl == ReplState::Established);
        if self.witness && q.solo_granted && all_established && self.connected {
            let m = ToWitness::Release {
                volume: self.volume.clone(),
            };
            if self.send(m) {
                replica.revoke_solo();
            }
        }
        if self.auto_failover
            && self.connected
            && role == Role::Secondary
            && disk == DiskState::UpToDate
            && !self.outdated
            && !asked_recently
            && self
                .primary_lost_at
                .is_some_and(|t| now.since(t) >= self.failover_timeout)
        {
            self.note(Note::AskingTakeover);
            let m = ToWitness::Solo {
                volume: self.volume.clone(),
                promote: true,
                lagging,
            };
            if self.send(m) {
                self.asked = Some(now);
            }
        }
    }

    /// Fails the held writes and demotes (retried on every tick while
    /// requests are still in flight).
    fn stand_down(&mut self, replica: &mut Replica, now: Time) {
        replica.fail_held(now, errno::EIO);
        if let Err(e) = replica.demote(now) {
            self.note(Note::DemoteFailed(e.to_string()));
        }
    }

    /// Acts on a verdict from the witness. `wall_ms` is the wall clock
    /// (ms since the Unix epoch) a failover promotion records.
    pub fn verdict(&mut self, replica: &mut Replica, now: Time, v: Verdict, wall_ms: u64) {
        if v.volume != self.volume {
            return;
        }
        self.holder = v.holder.clone();
        let was_outdated = self.outdated;
        self.outdated = v.outdated;
        // The witness names this Secondary holder without a takeover under
        // way (it crashed before the grant arrived, or restarted after
        // writing alone): it finishes the takeover, since nobody else may
        // be promoted.
        let finish_takeover = self.auto_failover
            && !v.outdated
            && v.answers != Answers::Solo
            && v.holder.as_deref() == Some(replica.config().node_name.as_str())
            && replica.role() == Role::Secondary
            && replica.disk_state() == DiskState::UpToDate;
        if v.answers == Answers::Solo || finish_takeover {
            self.asked = None;
            if v.granted || finish_takeover {
                replica.grant_solo(now);
                if (v.promote || finish_takeover) && replica.role() == Role::Secondary {
                    replica.set_wall_clock(wall_ms);
                    // A node that takes over must not volunteer to be
                    // overwritten in the next split brain (R24).
                    if self.set_discard {
                        let _ = replica.set_discard_my_data(false);
                        self.set_discard = false;
                    }
                    match replica.promote(now) {
                        Ok(()) => {
                            self.failovers += 1;
                            self.note(Note::FailedOver);
                        }
                        Err(e) => self.note(Note::PromotionRefused(e.to_string())),
                    }
                }
            } else {
                self.note(Note::Denied(v.reason.clone()));
            }
        }
        if v.outdated && !was_outdated {
            self.note(Note::StandingDown(v.reason.clone()));
        }
        if v.outdated {
            if replica.role() == Role::Primary {
                self.stand_down(replica, now);
            }
            if replica.role() == Role::Secondary
                && !replica.discard_my_data()
                && replica.disk_state() != DiskState::Inconsistent
            {
                // Its writes since the split were never acknowledged: a
                // split brain found on reconnect resolves in the peer's
                // favour (R24).
                if replica.set_discard_my_data(true).is_ok() {
                    self.set_discard = true;
                }
            }
        } else if self.set_discard {
            // The witness no longer counts it as outdated (it was resynced
            // and the holder released): the volunteering it started ends,
            // or a later split brain would wrongly discard this node's
            // acknowledged writes.
            if replica.discard_my_data() {
                let _ = replica.set_discard_my_data(false);
            }
            self.set_discard = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solo(promote: bool, lagging: &[&str]) -> ToWitness {
        ToWitness::Solo {
            volume: "v".into(),
            promote,
            lagging: lagging.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn report(primary: bool) -> ToWitness {
        ToWitness::Report {
            volume: "v".into(),
            primary,
            disk: "UpToDate".into(),
            lagging: vec![],
        }
    }

    #[test]
    fn one_holder_at_a_time_and_the_outdated_stay_out() {
        let mut a = Arbiter::default();
        a.handle("alpha", 1, report(true));
        a.handle("beta", 2, report(false));
        let (v, _) = a.handle("beta", 2, solo(true, &["alpha"]));
        assert!(!v.granted, "{v:?}");
        let (v, undo) = a.handle("alpha", 1, solo(false, &["beta"]));
        assert!(v.granted && v.holder.as_deref() == Some("alpha"));
        assert!(undo.is_some(), "a grant changes the durable state");
        a.disconnected(1);
        let (v, undo) = a.handle("beta", 2, solo(true, &["alpha"]));
        assert!(!v.granted && v.outdated && undo.is_none(), "{v:?}");
        // A restart keeps only the durable state.
        let mut a = Arbiter::new(a.volumes().clone());
        let (v, _) = a.handle("beta", 3, report(false));
        assert!(v.outdated);
        a.handle("alpha", 4, report(true));
        let (v, _) = a.handle("alpha", 4, ToWitness::Release { volume: "v".into() });
        assert!(v.granted && v.holder.is_none());
        assert!(!a.handle("beta", 3, report(false)).0.outdated);
    }

    fn replica() -> Replica {
        let cfg = crate::repl::Config::new(
            "alpha",
            *b"tandem-test-vol1",
            1 << 20,
            512,
            vec!["bravo".to_owned()],
        );
        Replica::new(cfg, Time::ZERO).expect("valid config")
    }

    fn verdict(answers: Answers, outdated: bool, granted: bool, promote: bool) -> Verdict {
        Verdict {
            volume: "v".into(),
            answers,
            promote,
            granted,
            holder: Some("bravo".into()),
            outdated,
            reason: String::new(),
        }
    }

    /// Found by the simulator: a node told it is outdated volunteered to
    /// discard its data, was resynced (which clears the flag), then got one
    /// more "outdated" answer still in flight from before the holder's
    /// release and volunteered again, for good: later, promoted by a
    /// failover, it was a Primary volunteering to be overwritten, and the
    /// next split brain (both sides volunteering) could never resolve.
    #[test]
    fn the_discard_flag_it_set_ends_once_the_node_is_no_longer_outdated() {
        let mut r = replica();
        let mut q = QuorumCtl::new(
            "v".into(),
            true,
            true,
            Duration::from_secs(1),
            NoQuorum::Suspend,
        );
        q.witness_up();
        assert_eq!(r.disk_state(), DiskState::UpToDate);
        q.verdict(
            &mut r,
            Time::ZERO,
            verdict(Answers::Report, true, false, false),
            0,
        );
        assert!(r.discard_my_data(), "standing down volunteers to discard");
        q.verdict(
            &mut r,
            Time::ZERO,
            verdict(Answers::Report, false, false, false),
            0,
        );
        assert!(
            !r.discard_my_data(),
            "no longer outdated: no longer volunteering"
        );
        // A failover promotion never keeps the flag.
        q.verdict(
            &mut r,
            Time::ZERO,
            verdict(Answers::Report, true, false, false),
            0,
        );
        assert!(r.discard_my_data());
        let mut v = verdict(Answers::Solo, false, true, true);
        v.holder = Some("alpha".into());
        q.verdict(&mut r, Time::ZERO, v, 0);
        assert_eq!(r.role(), Role::Primary);
        assert!(!r.discard_my_data());
        // A flag set by the operator is left alone.
        let mut r = replica();
        let mut q = QuorumCtl::new(
            "v".into(),
            true,
            true,
            Duration::from_secs(1),
            NoQuorum::Suspend,
        );
        r.set_discard_my_data(true).expect("secondary");
        q.verdict(
            &mut r,
            Time::ZERO,
            verdict(Answers::Report, false, false, false),
            0,
        );
        assert!(r.discard_my_data());
    }

    /// Found by the simulator: an outdated Primary with a write still in
    /// flight (not yet done locally, so not yet held) when the verdict
    /// came could not demote, and nothing retried: it stayed Primary, the
    /// peer refused it as sync target, and the replicas never converged.
    #[test]
    fn an_outdated_primary_stands_down_once_its_requests_are_done() {
        use crate::repl::{Input, Op, Output, ReqId};
        let mut cfg = crate::repl::Config::new(
            "alpha",
            *b"tandem-test-vol1",
            1 << 20,
            512,
            vec!["bravo".to_owned()],
        );
        cfg.initial_role = Role::Primary;
        cfg.solo_needs_grant = true;
        let mut r = Replica::new(cfg, Time::ZERO).expect("valid config");
        let mut q = QuorumCtl::new(
            "v".into(),
            true,
            true,
            Duration::from_secs(1),
            NoQuorum::Suspend,
        );
        q.witness_up();
        r.handle(
            Time::ZERO,
            Input::Frontend {
                req: ReqId(1),
                op: Op::Write {
                    offset: 0,
                    data: bytes::Bytes::from(vec![7u8; 512]),
                    fua: false,
                },
            },
        );
        // Metadata writes complete at once; the data write stays in flight.
        let mut data_io = None;
        for _ in 0..10 {
            let mut metas = Vec::new();
            while let Some(o) = r.poll_output() {
                match o {
                    Output::MetaWrite { io, .. } => metas.push(io),
                    Output::LocalIo { io, .. } => data_io = Some(io),
                    _ => {}
                }
            }
            if metas.is_empty() {
                break;
            }
            for io in metas {
                r.handle(Time::ZERO, Input::LocalDone { io, result: Ok(()) });
            }
        }
        let data_io = data_io.expect("the write was submitted");
        q.verdict(
            &mut r,
            Time::ZERO,
            verdict(Answers::Report, true, false, false),
            0,
        );
        assert_eq!(r.role(), Role::Primary, "demote is refused while in flight");
        r.handle(
            Time::ZERO,
            Input::LocalDone {
                io: data_io,
                result: Ok(()),
            },
        );
        q.tick(&mut r, Time::ZERO);
        assert_eq!(r.role(), Role::Secondary, "the tick stands down");
        let failed = std::iter::from_fn(|| r.poll_output()).any(|o| {
            matches!(
                o,
                Output::Complete {
                    req: ReqId(1),
                    result: Err(errno::EIO)
                }
            )
        });
        assert!(failed, "the held write failed");
    }

    /// Found by the simulator: a Secondary whose peer was granted writing
    /// alone after the Secondary's last report never learnt it was
    /// outdated (the witness only answers), kept `discard_my_data` off,
    /// and the split brain found on reconnect never resolved. While a
    /// peer lags, the report is repeated.
    #[test]
    fn the_report_is_repeated_while_a_peer_lags() {
        let mut r = replica();
        let mut q = QuorumCtl::new(
            "v".into(),
            true,
            true,
            Duration::from_secs(1),
            NoQuorum::Suspend,
        );
        q.witness_up();
        let reports = |q: &mut QuorumCtl| {
            std::iter::from_fn(|| q.poll())
                .filter(|o| matches!(o, QuorumOutput::Send(ToWitness::Report { .. })))
                .count()
        };
        q.tick(&mut r, Time::ZERO);
        assert_eq!(reports(&mut q), 1);
        q.tick(&mut r, Time::ZERO + Duration::from_millis(500));
        assert_eq!(reports(&mut q), 0);
        q.tick(&mut r, Time::ZERO + Duration::from_millis(1100));
        assert_eq!(
            reports(&mut q),
            1,
            "the peer is not connected: report again"
        );
        q.verdict(
            &mut r,
            Time::ZERO + Duration::from_millis(1200),
            verdict(Answers::Report, true, false, false),
            0,
        );
        assert!(r.discard_my_data(), "it learnt it is outdated");
    }

    /// Found by the simulator: a Secondary granted a takeover crashed
    /// before the verdict arrived; restarted, it never asked again (it had
    /// seen no Primary since), while the witness kept it holder and the
    /// other side outdated, so nobody could be promoted. A verdict naming
    /// it holder now makes it finish the takeover.
    #[test]
    fn a_secondary_the_witness_names_holder_finishes_the_takeover() {
        let mut r = replica();
        let mut q = QuorumCtl::new(
            "v".into(),
            true,
            true,
            Duration::from_secs(1),
            NoQuorum::Suspend,
        );
        q.witness_up();
        let mut v = verdict(Answers::Report, false, false, false);
        v.holder = Some("alpha".into());
        q.verdict(&mut r, Time::ZERO, v, 0);
        assert_eq!(r.role(), Role::Primary);
        assert!(r.quorum().solo_granted);
        assert_eq!(q.failovers(), 1);
        // Another holder: nothing happens.
        let mut r = replica();
        let mut q = QuorumCtl::new(
            "v".into(),
            true,
            true,
            Duration::from_secs(1),
            NoQuorum::Suspend,
        );
        q.verdict(
            &mut r,
            Time::ZERO,
            verdict(Answers::Report, false, false, false),
            0,
        );
        assert_eq!(r.role(), Role::Secondary);
    }

    #[test]
    fn revert_turns_a_grant_into_a_denial() {
        let mut a = Arbiter::default();
        let (mut v, undo) = a.handle("alpha", 1, solo(false, &["beta"]));
        assert!(v.granted);
        a.revert(undo.expect("changed"), "alpha", &mut v, "disk full");
        assert!(!v.granted && v.holder.is_none() && v.reason.contains("not saved"));
        assert!(a.volumes().get("v").is_none());
    }
}
