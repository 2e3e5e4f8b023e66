//! The CSI Identity service: name, version, capabilities, readiness.

use bpfman_csi::v1 as csi;
use bpfman_csi::v1::identity_server::Identity;
use bpfman_csi::v1::plugin_capability::{self, service, volume_expansion};
use tonic::{Request, Response, Status};

/// The driver's CSI name (the `CSIDriver` object and StorageClass `provisioner`).
pub const DRIVER_NAME: &str = "csi.tandem.io";

/// The identity service. In node mode its Probe also checks that the tools
/// and devices staging needs are present.
#[derive(Debug, Clone, Default)]
pub struct IdentityService {
    /// Programs that must be found (a name is looked up in `PATH`, `/usr/sbin`
    /// and `/sbin`; a path must be an executable file).
    pub required_programs: Vec<std::path::PathBuf>,
    /// Device files that must exist.
    pub required_devices: Vec<std::path::PathBuf>,
}

/// Whether `program` resolves to an executable file.
pub fn program_exists(program: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 {
        return executable(program);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(std::path::PathBuf::from))
        .any(|d| executable(&d.join(program)))
}

impl IdentityService {
    /// What is missing, if anything.
    pub fn missing(&self) -> Vec<String> {
        let mut m: Vec<String> = self
            .required_programs
            .iter()
            .filter(|p| !program_exists(p))
            .map(|p| format!("program {}", p.display()))
            .collect();
        m.extend(
            self.required_devices
                .iter()
                .filter(|d| !d.exists())
                .map(|d| format!("device {}", d.display())),
        );
        m
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        let svc = |t: service::Type| csi::PluginCapability {
            r#type: Some(plugin_capability::Type::Service(
                plugin_capability::Service { r#type: t as i32 },
            )),
        };
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![
                svc(service::Type::ControllerService),
                svc(service::Type::VolumeAccessibilityConstraints),
                csi::PluginCapability {
                    r#type: Some(plugin_capability::Type::VolumeExpansion(
                        plugin_capability::VolumeExpansion {
                            // Online: the Primary grows every replica (R29),
                            // the node its device (kernel nbd, or the
                            // built-in FUSE file + loop; docs/csi.md).
                            r#type: volume_expansion::Type::Online as i32,
                        },
                    )),
                },
            ],
        }))
    }

    async fn probe(
        &self,
        _request: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let missing = self.missing();
        if !missing.is_empty() {
            let msg = format!("not ready: missing {}", missing.join(", "));
            tracing::warn!("Probe: {msg}");
            return Err(Status::failed_precondition(msg));
        }
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}
