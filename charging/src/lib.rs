//! # atlasmesh-charging
//!
//! Will own Modbus TCP charger and meter drivers built from declarative register maps, the
//! failsafe control loop, and the depot's charging scheduler (a pure core). It arrives with the
//! charging work and has no code yet.
//!
//! Must not: let the scheduler do I/O, or write a setpoint that would take the site above its
//! limit, even between two writes.
