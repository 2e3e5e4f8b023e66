//! Superblock copies read from an untrusted disk. Must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tandem_core::superblock::{select, Superblock, SUPERBLOCK_SIZE};

fuzz_target!(|data: &[u8]| {
    let _ = Superblock::decode(data);
    if data.len() >= 2 * SUPERBLOCK_SIZE {
        let _ = select(&data[..SUPERBLOCK_SIZE], &data[SUPERBLOCK_SIZE..2 * SUPERBLOCK_SIZE]);
    }
});
