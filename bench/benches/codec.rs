//! Criterion micro-benchmarks for the hot codec paths of `tandem-core`:
//! the NBD request decode + validation done for every I/O, the reply headers
//! encoded for every completion, and the superblock encode/decode.
//!
//! Run: `cargo bench -p tandem-bench --bench codec`.

// std's black_box, not criterion's: criterion 0.5's fallback does a volatile
// read of the whole value, which for the 4 KiB superblock array becomes 4096
// byte loads and dominated the measurement (~6 µs instead of ~0.3 µs).
use std::hint::black_box;
use std::time::Duration;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tandem_core::nbd::{
    cmdflag, decode_request, encode_read_chunk_header, encode_simple_reply, validate_request,
    Command, ExportLimits, NbdError, Request, REQUEST_LEN, SIMPLE_REPLY_LEN, STRUCTURED_HEADER_LEN,
};
use tandem_core::superblock::{Superblock, SUPERBLOCK_SIZE};

const LIMITS: ExportLimits = ExportLimits {
    size: 1 << 30,
    min_block: 512,
    max_payload: 32 << 20,
    read_only: false,
};

fn write_4k() -> Request {
    Request {
        flags: cmdflag::FUA,
        command: Command::Write,
        cookie: 0x0123_4567_89ab_cdef,
        offset: 123 * 4096,
        length: 4096,
    }
}

fn bench_requests(c: &mut Criterion) {
    let req = write_4k();
    let mut wire = Vec::with_capacity(REQUEST_LEN);
    req.encode(&mut wire);
    assert_eq!(wire.len(), REQUEST_LEN);

    let mut g = c.benchmark_group("nbd_request");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_validate_write_4k", |b| {
        b.iter(|| {
            let r = decode_request(black_box(&wire)).expect("valid request");
            let v = validate_request(&r, black_box(&LIMITS));
            black_box((r, v))
        })
    });
    g.bench_function("decode_write_4k", |b| {
        b.iter(|| black_box(decode_request(black_box(&wire))))
    });
    g.bench_function("validate_write_4k", |b| {
        b.iter(|| black_box(validate_request(black_box(&req), black_box(&LIMITS))))
    });
    let mut out = BytesMut::with_capacity(REQUEST_LEN);
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            black_box(&req).encode(&mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

fn bench_replies(c: &mut Criterion) {
    // Sanity checks, outside the measured closures (which a filter may skip).
    let mut out = BytesMut::with_capacity(64);
    encode_simple_reply(&mut out, 42, None);
    assert_eq!(out.len(), SIMPLE_REPLY_LEN);
    out.clear();
    encode_read_chunk_header(&mut out, 42, 1 << 20, 4096, true);
    assert_eq!(out.len(), STRUCTURED_HEADER_LEN + 8);

    let mut g = c.benchmark_group("nbd_reply");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_simple_reply_ok", |b| {
        b.iter(|| {
            out.clear();
            encode_simple_reply(&mut out, black_box(42), black_box(None));
            black_box(out.len())
        })
    });
    g.bench_function("encode_simple_reply_err", |b| {
        b.iter(|| {
            out.clear();
            encode_simple_reply(&mut out, black_box(42), black_box(Some(NbdError::Io)));
            black_box(out.len())
        })
    });
    g.bench_function("encode_read_chunk_header", |b| {
        b.iter(|| {
            out.clear();
            encode_read_chunk_header(
                &mut out,
                black_box(42),
                black_box(1 << 20),
                black_box(4096),
                black_box(true),
            );
            black_box(out.len())
        })
    });
    g.finish();
}

fn bench_superblock(c: &mut Criterion) {
    let uuid = *b"\x11\x22\x33\x44\x55\x66\x47\x88\x99\xaa\xbb\xcc\xdd\xee\xff\x01";
    let sb = Superblock::new(uuid, "bench-volume", 1 << 30, 4096, 1_700_000_000)
        .expect("valid superblock");
    let encoded = sb.encode();
    assert_eq!(Superblock::decode(&encoded).expect("round trip"), sb);

    let mut g = c.benchmark_group("superblock");
    g.throughput(Throughput::Bytes(SUPERBLOCK_SIZE as u64));
    g.bench_function("encode", |b| b.iter(|| black_box(black_box(&sb).encode())));
    g.bench_function("decode", |b| {
        b.iter(|| black_box(Superblock::decode(black_box(&encoded[..]))))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_requests, bench_replies, bench_superblock
}
criterion_main!(benches);
