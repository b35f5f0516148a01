//! # atlasmesh-vehicle-link
//!
//! Owns the vehicle's side of the depot: the reference vehicle OTA client ([`ota`]), the MQTT
//! wire format ([`wire`]: topics, payloads and the topic ACL, checked without I/O), the fleet
//! simulator ([`sim`]) and the front of the embedded broker that enforces the ACL
//! ([`front`]). The depot's client, registry and broker wiring are in the appliance crate.
//!
//! Must not: trust a byte before verifying it (metadata by TUF, chunks and images by hash), or
//! let one vehicle act on another's assignment.

pub mod front;
pub mod ota;
pub mod sim;
pub mod wire;
