//! The handshake from a hostile client: client flags, option headers and
//! option data through the negotiation state machine. Must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tandem_core::nbd::{
    decode_client_flags, decode_option_header, BlockSizes, ExportCatalog, ExportInfo, Negotiation,
};

struct Catalog;

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name.is_empty() || name == "vol").then(|| ExportInfo {
            name: "vol".into(),
            description: "fuzz".into(),
            size: 1 << 30,
            flags: 1,
            block_sizes: BlockSizes { minimum: 512, preferred: 4096, maximum: 32 << 20 },
        })
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![("vol".into(), "fuzz".into())]
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(flags) = decode_client_flags(data) else { return };
    let mut n = Negotiation::new(flags);
    let mut rest = &data[4.min(data.len())..];
    let mut out = Vec::new();
    while rest.len() >= 16 {
        let Ok(h) = decode_option_header(rest) else { return };
        rest = &rest[16..];
        let len = (h.length as usize).min(rest.len());
        let _ = n.handle_option(h.option, &rest[..len], &Catalog, &mut out);
        rest = &rest[len..];
        out.clear();
    }
});
