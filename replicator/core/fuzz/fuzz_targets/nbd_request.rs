//! Request headers from a hostile client: decode, then validate against an
//! export. Must never panic; a validated range must lie inside the export.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tandem_core::nbd::{decode_request, validate_request, Command, ExportLimits};

fuzz_target!(|data: &[u8]| {
    let limits = ExportLimits {
        size: 1 << 30,
        min_block: 512,
        max_payload: 32 << 20,
        read_only: data.first().is_some_and(|b| b & 1 == 1),
    };
    for chunk in data.chunks(28) {
        if let Ok(req) = decode_request(chunk) {
            if validate_request(&req, &limits).is_ok()
                && matches!(req.command, Command::Read | Command::Write | Command::Trim | Command::WriteZeroes)
            {
                assert!(req.offset + u64::from(req.length) <= limits.size);
            }
        }
    }
});
