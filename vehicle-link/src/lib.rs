//! # atlasmesh-vehicle-link
//!
//! Owns the vehicle's side of the depot: today the reference vehicle OTA client ([`ota`]),
//! which tests use and the fleet simulator will. The MQTT topics and payloads, the depot side
//! of the link, the embedded broker and the simulator arrive with the vehicle-link work.
//!
//! Must not: trust a byte before verifying it (metadata by TUF, chunks and images by hash), or
//! let one vehicle act on another's assignment.

pub mod ota;
