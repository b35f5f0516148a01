//! # atlasmesh-cloud-sync
//!
//! Owns the link between depots and the cloud fleet core. Today that is the cloud's own store
//! ([`CloudStore`], through sqlx with embedded migrations). The gRPC protocol, enrolment with
//! mTLS, the depot's outbox and the sync sessions arrive with the federation work; nothing here
//! pretends to sync yet.
//!
//! Must not: reach into the depot store (the depot hands it events and state through its own
//! API), or decide rollouts (it carries the cloud's desired state, the depot decides).

mod store;

pub use store::{CloudStore, CloudStoreError};
