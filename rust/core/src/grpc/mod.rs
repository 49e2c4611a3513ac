//! The gRPC API (`gateway.v1`, from `protos/`): a second surface over the same pipeline as the
//! OpenAI HTTP API. Calls become the OpenAI request they stand for and go through `dispatch`, so
//! authentication, quotas, routing and metering are the HTTP code path; only the translation of
//! requests, answers and errors lives here.

mod codec;
mod convert;
mod guard;
mod server;
mod service;
mod status;
mod usage;

pub use server::GrpcServer;

/// The messages and service traits generated from `protos/gateway/v1/inference.proto`.
#[expect(
    clippy::allow_attributes,
    reason = "generated code allows what it needs"
)]
pub mod pb {
    tonic::include_proto!("gateway.v1");

    /// Every file of the contract, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("gateway_v1_descriptor");
}
