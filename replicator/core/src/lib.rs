//! Tandem's sans-IO core.
//!
//! Everything in this crate is pure: it never opens a file or socket, never
//! reads a clock and never spawns a task. Callers feed it bytes (and, where a
//! decision depends on time, `now`) and get back decoded values or bytes to
//! write. That keeps the protocol and format logic deterministic, fuzzable and
//! usable from the daemon, the simulator and the tests alike.
//!
//! * [`nbd`] — the NBD (network block device) protocol: handshake options,
//!   transmission requests and replies, and request validation against an
//!   export's limits.
//! * [`superblock`] — the on-disk volume superblock and metadata layout.
//! * [`repl`] — replication: wire frames and the per-volume replica state
//!   machine (roles, disk and peer states, write ordering, completion).
//! * [`witness`] — quorum with a witness: the witness's arbitration and the
//!   replica driver's quorum policy (grants, failover, standing down).

pub mod meta;
pub mod nbd;
pub mod repl;
pub mod superblock;
pub mod witness;
