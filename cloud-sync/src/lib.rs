//! # atlasmesh-cloud-sync
//!
//! Owns the link between depots and the cloud fleet core: the gRPC protocol
//! (`proto/atlasmesh/sync/v1/sync.proto`), the fleet CA and enrolment, the cloud's gRPC service
//! over its sqlx store ([`CloudStore`]: SQLite or PostgreSQL), and the depot's sync client.
//!
//! Must not: reach into the depot store (the depot hands the client its outbox, reported state
//! and desired-state storage through the [`client::DepotSide`] trait), or decide rollouts (it
//! carries the cloud's desired state; the depot decides what to do with it).

pub mod client;
pub mod desired;
mod fleet_store;
pub mod pki;
pub mod server;
mod store;
pub mod token;

pub use fleet_store::{FleetLogRow, FleetRolloutRow, FleetStep, NewFleetRollout};
pub use store::{
    AuditRow, CloudStore, CloudStoreError, DepotRow, DesiredRow, EventRow, ReportedRow,
    TokenRefused,
};

/// The generated protocol types and service stubs.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("atlasmesh.sync.v1");

    /// The encoded descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/sync_descriptor.bin"));
}
