//! End-to-end tests of tandemd's NBD server with real processes and real
//! NBD clients (fio, libnbd tools, qemu-io, nbdfuse + loop + ext4) and a raw
//! protocol client. Build the binaries first:
//! `cargo build --release --workspace && cargo test --release -p tandem-tests -- --test-threads=1`.

mod bad_input;
mod config_refusal;
mod filesystem;
mod fio_verify;
mod interop;
mod multi_conn;
