//! `tandem-csi`: Tandem's Kubernetes CSI driver (CSI spec v1).
//!
//! One binary, two modes. `tandem-csi controller` serves the Identity and
//! Controller services: volume records ([`store`]: a directory of files or
//! Kubernetes custom resources, [`kube_store`]), replica placement (the
//! pure [`placement::place`]), publication with dual-primary for
//! MULTI_NODE_MULTI_WRITER block volumes. `tandem-csi node` serves Identity
//! and Node: it runs a `tandemd` per staged volume and attaches it as a
//! block device (`nbdfuse` + a loop device), formats and mounts
//! filesystems, and bind-mounts into pods. Both speak gRPC on a unix socket.
//!
//! The CSI protobuf types and service traits come from the `bpfman-csi`
//! crate (generated code shipped in the crate, built with tonic 0.11).

pub mod agent;
pub mod controller;
pub mod error;
pub mod fuse_nbd;
pub mod identity;
pub mod inflight;
pub mod inventory;
pub mod kube_store;
pub mod nbd_kernel;
pub mod node;
pub mod params;
pub mod placement;
pub mod server;
pub mod store;
pub mod sys;

pub use bpfman_csi::v1 as csi;
