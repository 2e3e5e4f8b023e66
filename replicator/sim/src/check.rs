//! The model of what the frontend was promised, and the invariant checks.
//!
//! Every block written by the simulated workload carries a *tag*: the id of
//! the frontend request that wrote it (0 for zeroes: the initial content,
//! TRIM and WRITE_ZEROES). Overlapping requests are ordered by the replica
//! (rule R7), so each block has one history: the tags of the requests that
//! touched it, in issue order. The checks compare disk contents against
//! positions in those histories.

use bytes::{BufMut, Bytes, BytesMut};

/// Content of block `b` written by request `tag` (`tag != 0`).
pub fn block_content(tag: u64, b: usize, bs: usize) -> Bytes {
    let mut v = BytesMut::with_capacity(bs);
    v.put_u64_le(tag);
    v.put_u64_le(b as u64);
    v.resize(bs, tag as u8 | 1);
    v.freeze()
}

/// Decodes the tag of block `b`, or says why the content is not one the
/// workload could have written (corruption, misplaced data).
pub fn tag_of(data: &[u8], b: usize) -> Result<u64, String> {
    if data.iter().all(|x| *x == 0) {
        return Ok(0);
    }
    if data.len() < 16 {
        return Err(format!("block {b}: short block"));
    }
    let tag = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
    if tag != 0 && block_content(tag, b, data.len())[..] == *data {
        Ok(tag)
    } else {
        Err(format!(
            "block {b}: content is not any write's data (torn, misplaced or corrupt)"
        ))
    }
}

#[derive(Debug, Clone)]
struct Issued {
    /// (block, position in that block's history).
    blocks: Vec<(usize, usize)>,
    /// For flushes: per block, the newest position completed when issued.
    flush_floor: Option<Vec<usize>>,
}

/// The frontend's view of one primary's volume.
#[derive(Debug, Clone)]
pub struct Model {
    history: Vec<Vec<u64>>,
    issued: std::collections::BTreeMap<u64, Issued>,
    completed: Vec<usize>,
    /// Per block, the oldest position that an acknowledged FLUSH or FUA
    /// promised durable: every later Primary must hold it or newer.
    acked: Vec<usize>,
}

impl Model {
    /// A volume of `blocks` zeroed blocks.
    pub fn new(blocks: usize) -> Model {
        Model {
            history: vec![vec![0]; blocks],
            issued: Default::default(),
            completed: vec![0; blocks],
            acked: vec![0; blocks],
        }
    }

    /// A new Primary took over (failover, or the old one restarted after a
    /// crash): the frontend's view starts again from what it holds, per
    /// block its durable and its current tag (requests in flight at the
    /// crash may or may not have reached it).
    pub fn rebase(&mut self, durable: &[u64], current: &[u64]) {
        for (b, h) in self.history.iter_mut().enumerate() {
            h.clear();
            h.push(durable[b]);
            if current[b] != durable[b] {
                h.push(current[b]);
            }
            self.completed[b] = h.len() - 1;
            self.acked[b] = 0;
        }
        self.issued.clear();
    }

    /// The request `req` is known (issued since the last rebase).
    pub fn knows(&self, req: u64) -> bool {
        self.issued.contains_key(&req)
    }

    /// Flush or FUA request `req` completed OK: what it covers is promised
    /// durable.
    pub fn acked_durable(&mut self, req: u64) {
        let Some(i) = self.issued.get(&req) else {
            return;
        };
        match &i.flush_floor {
            Some(f) => {
                for (b, p) in f.iter().enumerate() {
                    self.acked[b] = self.acked[b].max(*p);
                }
            }
            None => {
                for (b, p) in &i.blocks {
                    self.acked[*b] = self.acked[*b].max(*p);
                }
            }
        }
    }

    /// No acknowledged write is lost: `current(b)` of the node that becomes
    /// Primary holds every write a FLUSH or FUA acknowledged, or newer.
    pub fn check_holds_acked(
        &self,
        who: &str,
        current: impl Fn(usize) -> Result<u64, String>,
    ) -> Result<(), String> {
        for (b, floor) in self.acked.iter().enumerate() {
            let tag = current(b).map_err(|e| format!("{who}: {e}"))?;
            if !self.at_least(b, tag, *floor) {
                return Err(format!(
                    "{who} became Primary holding {tag} in block {b}, but {} was acknowledged durable (history {:?}): an acknowledged write was lost",
                    self.history[b][*floor], self.history[b]
                ));
            }
        }
        Ok(())
    }

    /// Request `req` writes `n` blocks from `first`, with `tag` (its id, or 0
    /// for zeroes).
    pub fn issue_write(&mut self, req: u64, first: usize, n: usize, tag: u64) {
        let blocks = (first..first + n)
            .map(|b| {
                self.history[b].push(tag);
                (b, self.history[b].len() - 1)
            })
            .collect();
        self.issued.insert(
            req,
            Issued {
                blocks,
                flush_floor: None,
            },
        );
    }

    /// Request `req` is a flush.
    pub fn issue_flush(&mut self, req: u64) {
        self.issued.insert(
            req,
            Issued {
                blocks: Vec::new(),
                flush_floor: Some(self.completed.clone()),
            },
        );
    }

    /// Request `req` completed successfully.
    pub fn complete(&mut self, req: u64) {
        if let Some(i) = self.issued.get(&req) {
            for (b, p) in &i.blocks {
                self.completed[*b] = self.completed[*b].max(*p);
            }
        }
    }

    fn at_least(&self, b: usize, tag: u64, floor: usize) -> bool {
        self.history[b][floor..].contains(&tag)
    }

    /// Invariant (a): after flush or FUA request `req` completed, the durable
    /// content `durable(b)` of replica `who` holds, for every block the
    /// request covers, the newest completed write (or a newer one).
    pub fn check_durable(
        &self,
        req: u64,
        who: &str,
        durable: impl Fn(usize) -> Result<u64, String>,
    ) -> Result<(), String> {
        let Some(i) = self.issued.get(&req) else {
            return Err(format!("request {req} was never issued"));
        };
        let floors: Vec<(usize, usize)> = match &i.flush_floor {
            Some(f) => f.iter().copied().enumerate().collect(),
            None => i.blocks.clone(),
        };
        for (b, floor) in floors {
            let tag = durable(b).map_err(|e| format!("{who}: {e}"))?;
            if !self.at_least(b, tag, floor) {
                return Err(format!(
                    "{who}: after request {req} completed, block {b} is durably {tag} but must be {} or newer (history {:?})",
                    self.history[b][floor], self.history[b]
                ));
            }
        }
        Ok(())
    }

    /// At quiescence every request completed: `current(b)` must be the last
    /// write of each block's history.
    pub fn check_latest(
        &self,
        who: &str,
        current: impl Fn(usize) -> Result<u64, String>,
    ) -> Result<(), String> {
        for (b, h) in self.history.iter().enumerate() {
            let tag = current(b).map_err(|e| format!("{who}: {e}"))?;
            let want = *h.last().unwrap_or(&0);
            if tag != want {
                return Err(format!(
                    "{who}: block {b} holds {tag}, the last completed write is {want}"
                ));
            }
        }
        Ok(())
    }
}

/// Invariant (b): at most one Primary (two with dual-primary).
pub fn check_primaries(primaries: usize, dual: bool) -> Result<(), String> {
    let max = if dual { 2 } else { 1 };
    if primaries > max {
        Err(format!("{primaries} Primaries (at most {max} allowed)"))
    } else {
        Ok(())
    }
}

/// Invariants (c) and (d) at quiescence, for one secondary: if either side
/// calls it UpToDate its content equals the primary's; if the primary holds
/// it Outdated it must know.
pub fn check_secondary(
    who: &str,
    primary_says_up_to_date: bool,
    primary_holds_outdated: bool,
    own_up_to_date: bool,
    same_content: bool,
) -> Result<(), String> {
    if primary_holds_outdated && own_up_to_date {
        return Err(format!(
            "{who}: the primary holds it Outdated but it reports UpToDate"
        ));
    }
    if (primary_says_up_to_date || own_up_to_date) && !same_content {
        return Err(format!(
            "{who}: reported UpToDate (by primary: {primary_says_up_to_date}, by itself: {own_up_to_date}) but its content differs from the primary's"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_corruption_is_caught() {
        let d = block_content(42, 3, 512);
        assert_eq!(tag_of(&d, 3), Ok(42));
        assert!(tag_of(&d, 4).is_err(), "misplaced block");
        let mut c = d.to_vec();
        c[100] ^= 1;
        assert!(tag_of(&c, 3).is_err());
        assert_eq!(tag_of(&[0; 512], 9), Ok(0));
    }

    #[test]
    fn durability_check_rejects_a_lost_flushed_write() {
        let mut m = Model::new(4);
        m.issue_write(1, 0, 2, 1);
        m.complete(1);
        m.issue_flush(2);
        m.issue_write(3, 1, 1, 3); // in flight during the flush
        m.complete(2);
        // Good: block 0 has write 1; block 1 has 1 or the newer 3.
        let ok = |b: usize| Ok([1, 3, 0, 0][b]);
        assert_eq!(m.check_durable(2, "b", ok), Ok(()));
        // Bad: block 0 lost write 1 (still the initial zeroes).
        let lost = |b: usize| Ok([0, 1, 0, 0][b]);
        let e = m.check_durable(2, "b", lost).unwrap_err();
        assert!(e.contains("block 0"), "{e}");
        // Bad: a write that never happened.
        assert!(m.check_durable(2, "b", |_| Ok(77)).is_err());
    }

    #[test]
    fn fua_check_covers_its_own_blocks() {
        let mut m = Model::new(4);
        m.issue_write(1, 2, 1, 1);
        m.complete(1);
        assert!(m
            .check_durable(1, "a", |b| Ok(if b == 2 { 1 } else { 0 }))
            .is_ok());
        assert!(m.check_durable(1, "a", |_| Ok(0)).is_err());
    }

    #[test]
    fn latest_check_rejects_reordered_overlapping_writes() {
        let mut m = Model::new(1);
        m.issue_write(1, 0, 1, 1);
        m.issue_write(2, 0, 1, 2);
        m.complete(1);
        m.complete(2);
        assert!(m.check_latest("a", |_| Ok(2)).is_ok());
        assert!(m.check_latest("a", |_| Ok(1)).is_err());
    }

    #[test]
    fn a_new_primary_must_hold_acknowledged_writes() {
        let mut m = Model::new(2);
        m.issue_write(1, 0, 1, 1);
        m.complete(1);
        m.issue_flush(2);
        m.complete(2);
        m.acked_durable(2);
        assert!(m.check_holds_acked("b", |b| Ok([1, 0][b])).is_ok());
        assert!(m.check_holds_acked("b", |_| Ok(0)).is_err());
        m.rebase(&[1, 0], &[1, 0]);
        assert!(!m.knows(1));
        assert!(m.check_latest("b", |b| Ok([1, 0][b])).is_ok());
    }

    #[test]
    fn role_and_secondary_checks_fail_on_bad_states() {
        assert!(check_primaries(2, false).is_err());
        assert!(check_primaries(2, true).is_ok());
        assert!(check_primaries(3, true).is_err());
        assert!(check_secondary("b", true, false, true, false).is_err());
        assert!(check_secondary("b", false, false, true, false).is_err());
        assert!(check_secondary("b", false, true, true, true).is_err());
        assert!(check_secondary("b", false, true, false, false).is_ok());
    }
}
