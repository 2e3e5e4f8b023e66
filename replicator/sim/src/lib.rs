//! Deterministic simulation of Tandem replicas (work in progress).
