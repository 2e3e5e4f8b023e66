//! `tandem-csi`: placeholder binary until the CSI issue lands.

fn main() {
    eprintln!("tandem-csi: the CSI gRPC driver is not implemented yet; see docs/architecture.md");
    std::process::exit(2);
}
