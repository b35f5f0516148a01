//! # atlasmesh-vehicle-link
//!
//! Will own the MQTT topics and payloads between depot and vehicles, the depot side of the
//! link, the embedded broker default, the reference vehicle OTA client and the fleet simulator.
//! It arrives with the vehicle-link and OTA staging work and has no code yet.
//!
//! Must not: trust a payload before validating it, or let one vehicle's credentials speak for
//! another.
