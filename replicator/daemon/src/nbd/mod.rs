//! The NBD frontend: a server for QEMU, the kernel and libnbd clients, and a
//! small client used by the demo and tests.

pub mod client;
pub mod server;
