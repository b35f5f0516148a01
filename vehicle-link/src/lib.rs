//! # atlasmesh-vehicle-link
//!
//! Owns the vehicle's side of the depot: the reference vehicle OTA client ([`ota`]), which
//! tests use and the fleet simulator will, and the MQTT wire format ([`wire`]: topics and
//! payloads, parsed and checked without I/O). The depot side of the link, the embedded broker
//! and the simulator arrive with the rest of the vehicle-link work.
//!
//! Must not: trust a byte before verifying it (metadata by TUF, chunks and images by hash), or
//! let one vehicle act on another's assignment.

pub mod front;
pub mod ota;
pub mod wire;
