//! Compiles the gRPC contract in `protos/` (at the workspace root) into the `grpc` module's
//! messages and service traits, and a descriptor set for server reflection. protoc comes from
//! `protoc-bin-vendored`: building needs no system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Cargo's variable when the script runs, not `env!` (where the script was compiled): a target
    // directory shared by several checkouts reuses one compiled script for all of them.
    let protos = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../protos");
    let files = ["inference.proto", "usage.proto"].map(|f| protos.join("gateway/v1").join(f));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = PathBuf::from(std::env::var("OUT_DIR")?).join("gateway_v1_descriptor.bin");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(false)
        // Malformed requests are the client's fault: INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::grpc::codec::StrictCodec")
        .file_descriptor_set_path(descriptors)
        .compile_with_config(config, &files, &[protos])?;
    Ok(())
}
