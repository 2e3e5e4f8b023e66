//! An in-memory disk with a volatile cache: writes are lost on a crash unless
//! a flush covered them or they were written with FUA.
//!
//! Per block the disk keeps the durable content and the versions written
//! since (oldest first, each with the completion counter it got). A flush
//! submitted when the counter was `m` persists, per block, the newest version
//! with counter ≤ `m` (writes that completed before the flush was submitted);
//! later versions stay volatile. A crash keeps a random prefix of each
//! block's volatile versions (a real cache may have written some back) and
//! drops the rest.

use bytes::Bytes;

use crate::rng::Rng;

/// The simulated disk of one node.
#[derive(Debug, Clone)]
pub struct SimDisk {
    bs: usize,
    durable: Vec<Bytes>,
    /// Volatile versions per block: (completion counter, content).
    cache: Vec<Vec<(u64, Bytes)>>,
    counter: u64,
    /// Testing the checker: flushes and FUA do nothing (a disk that lies).
    pub lying: bool,
}

impl SimDisk {
    /// A zeroed disk of `blocks` blocks of `bs` bytes.
    pub fn new(blocks: usize, bs: usize) -> SimDisk {
        let zero = Bytes::from(vec![0u8; bs]);
        SimDisk {
            bs,
            durable: vec![zero; blocks],
            cache: vec![Vec::new(); blocks],
            counter: 0,
            lying: false,
        }
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.durable.len()
    }

    /// What a read of block `b` returns now.
    pub fn current(&self, b: usize) -> &Bytes {
        self.cache[b]
            .last()
            .map(|(_, d)| d)
            .unwrap_or(&self.durable[b])
    }

    /// What block `b` holds after a crash that loses every volatile version.
    pub fn durable(&self, b: usize) -> &Bytes {
        &self.durable[b]
    }

    /// Completes a write of whole blocks starting at block `first`.
    pub fn write(&mut self, first: usize, data: &Bytes, fua: bool) {
        for (k, chunk_start) in (0..data.len()).step_by(self.bs).enumerate() {
            let b = first + k;
            let d = data.slice(chunk_start..chunk_start + self.bs);
            self.put(b, d, fua);
        }
    }

    /// Completes a trim or write-zeroes of `n` blocks (reads back zeroes).
    pub fn zero(&mut self, first: usize, n: usize, fua: bool) {
        let zero = Bytes::from(vec![0u8; self.bs]);
        for b in first..first + n {
            self.put(b, zero.clone(), fua);
        }
    }

    fn put(&mut self, b: usize, d: Bytes, fua: bool) {
        self.counter += 1;
        if fua && !self.lying {
            self.durable[b] = d;
            self.cache[b].clear();
        } else {
            self.cache[b].push((self.counter, d));
        }
    }

    /// The mark a flush submitted now must cover.
    pub fn flush_mark(&self) -> u64 {
        self.counter
    }

    /// Completes a flush submitted at `mark`.
    pub fn flush(&mut self, mark: u64) {
        if self.lying {
            return;
        }
        for b in 0..self.durable.len() {
            let c = &mut self.cache[b];
            if let Some(i) = c.iter().rposition(|(n, _)| *n <= mark) {
                self.durable[b] = c[i].1.clone();
                c.drain(..=i);
            }
        }
    }

    /// Power loss: each block keeps a random prefix of its volatile versions.
    pub fn crash(&mut self, rng: &mut Rng) {
        for b in 0..self.durable.len() {
            let c = std::mem::take(&mut self.cache[b]);
            let keep = rng.range(0, c.len() as u64 + 1) as usize;
            if keep > 0 {
                self.durable[b] = c[keep - 1].1.clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blk(v: u8) -> Bytes {
        Bytes::from(vec![v; 512])
    }

    #[test]
    fn flush_covers_only_writes_completed_before_it() {
        let mut d = SimDisk::new(2, 512);
        d.write(0, &blk(1), false);
        let m = d.flush_mark();
        d.write(0, &blk(2), false);
        d.flush(m);
        assert_eq!(d.durable(0)[0], 1);
        assert_eq!(d.current(0)[0], 2);
        d.write(1, &blk(3), true);
        assert_eq!(d.durable(1)[0], 3);
        let mut rng = Rng::new(1);
        for _ in 0..4 {
            let mut c = d.clone();
            c.crash(&mut rng);
            assert!(c.current(0)[0] == 1 || c.current(0)[0] == 2);
            assert_eq!(c.current(1)[0], 3);
        }
    }
}
