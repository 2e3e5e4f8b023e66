//! `tandem-daemon`: everything in Tandem that does I/O.
//!
//! * [`storage`] — engines over a backing file or block device (io_uring,
//!   sync, memory).
//! * [`volume`] — superblock checks and the data area of a backing.
//! * [`nbd`] — the NBD server (and a small client for the demo and tests).
//! * [`export`], [`config`], [`admin`], [`daemon`] — what `tandemd` runs.
//! * [`metrics`] — Prometheus metrics and the `/metrics` HTTP endpoint.
//! * [`demo`] — the README's one-command demo.
//! * [`transport`] — the peer transport: QUIC with mutual TLS, and the
//!   cluster CA / node certificate tool behind `tandemctl ca` and `tandemctl cert`.

pub mod admin;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod demo_sites;
pub mod export;
pub mod metrics;
pub mod nbd;
pub mod replication;
pub mod storage;
pub mod transport;
pub mod volume;
pub mod witness;

/// Parses sizes like `256M`, `1G`, `4096`, `1.5T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let mult: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("{s:?}: unknown unit (use K, M, G or T)")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 256M or 1G"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("{s:?} must be positive"));
    }
    Ok((n * mult as f64) as u64)
}

/// Formats a byte count for humans, binary units, no space so it stays one
/// token: `0B`, `512B`, `4KiB`, `64MiB`, `1.5GiB` (one decimal when not whole).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes}B");
    }
    let div = 1u64 << (10 * unit);
    if bytes % div == 0 {
        format!("{}{}", bytes / div, UNITS[unit])
    } else {
        format!("{:.1}{}", bytes as f64 / div as f64, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("256M"), Ok(256 << 20));
        assert_eq!(super::parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(super::parse_size("4096"), Ok(4096));
        assert!(super::parse_size("12Q").is_err());
        assert!(super::parse_size("-1G").is_err());
    }

    #[test]
    fn human_sizes() {
        use super::format_size;
        assert_eq!(format_size(0), "0B");
        assert_eq!(format_size(1023), "1023B");
        assert_eq!(format_size(4096), "4KiB");
        assert_eq!(format_size(64 << 20), "64MiB");
        assert_eq!(format_size(3 << 29), "1.5GiB");
        assert_eq!(format_size(1 << 50), "1PiB");
        assert_eq!(format_size(u64::MAX), "16384.0PiB");
    }
}
