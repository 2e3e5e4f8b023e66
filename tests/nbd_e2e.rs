//! End-to-end tests of tandemd's NBD server with real processes and real
//! NBD clients (fio, libnbd tools, qemu-io, nbdfuse + loop + ext4) and a raw
//! protocol client. Build the binaries first:
//! `cargo build --release --workspace && cargo test --release -p tandem-tests -- --test-threads=1`.

#[path = "nbd_e2e/bad_input.rs"]
mod bad_input;
#[path = "nbd_e2e/config_refusal.rs"]
mod config_refusal;
#[path = "nbd_e2e/demo.rs"]
mod demo;
#[path = "nbd_e2e/disk_errors.rs"]
mod disk_errors;
#[path = "nbd_e2e/diskless.rs"]
mod diskless;
#[path = "nbd_e2e/dual_primary.rs"]
mod dual_primary;
#[path = "nbd_e2e/filesystem.rs"]
mod filesystem;
#[path = "nbd_e2e/fio_verify.rs"]
mod fio_verify;
#[path = "nbd_e2e/interop.rs"]
mod interop;
#[path = "nbd_e2e/lifecycle.rs"]
mod lifecycle;
#[path = "nbd_e2e/metrics.rs"]
mod metrics;
#[path = "nbd_e2e/multi_conn.rs"]
mod multi_conn;
#[path = "nbd_e2e/quorum.rs"]
mod quorum;
#[path = "nbd_e2e/repl_common.rs"]
mod repl_common;
#[path = "nbd_e2e/replication.rs"]
mod replication;
#[path = "nbd_e2e/replication_netns.rs"]
mod replication_netns;
#[path = "nbd_e2e/resize.rs"]
mod resize;
#[path = "nbd_e2e/resync_checksums.rs"]
mod resync_checksums;
#[path = "nbd_e2e/three_replicas.rs"]
mod three_replicas;
#[path = "nbd_e2e/verify.rs"]
mod verify;
