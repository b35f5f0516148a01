//! # atlasmesh-ota-staging
//!
//! Owns OTA release trust and the depot's image cache:
//!
//! - [`release`]: release tooling for the fleet's image repository (standard TUF 1.0 through
//!   tough: keys, init, add, refresh, root rotation) and [`certificate`], the fleet's statement
//!   certifying a depot's director root.
//! - [`chunks`]: FastCDC chunking and the signed chunk index, in one pass over an image.
//! - [`trust`]: loading a TUF repository as a client, with typed refusals.
//! - [`staging`]: verify a release (metadata, policy, index), read the image once into a pack,
//!   publish it; [`store`]: the packs and the chunk map; [`director`]: the depot's director
//!   repository of per-vehicle assignments.
//! - [`online`]: the fleet core's online re-signing of snapshot and timestamp over the targets
//!   release engineering signed offline.
//! - [`bandwidth`]: the depot-wide, per-connection-fair upload cap.
//!
//! Must not: make anything visible to vehicles before every signature and hash has verified
//! (staging writes under `staging/` and publishes by rename), read the wall clock inside trust
//! decisions (a [`time::Clock`] is passed in), or know about HTTP routes, the depot store or
//! people: the appliance wires those.

pub mod bandwidth;
pub mod certificate;
pub mod chunks;
pub mod director;
pub mod keys;
pub mod meta;
pub mod online;
pub mod release;
pub mod staging;
pub mod store;
pub mod time;
pub mod trust;
