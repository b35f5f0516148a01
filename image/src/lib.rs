//! # atlasmesh-image
//!
//! The appliance disk image: the A/B GPT layout ([`layout`]), building it from a root file
//! system tree ([`build`]), bmap files in bmaptool's format ([`bmap`]), the signed manifest
//! ([`manifest`]), flashing with safety checks ([`flash`], [`device`]), and the appliance's
//! self-update into its inactive slot with boot counting ([`install`], [`bootenv`]).
//!
//! Must not: write to a device before its checks pass, or leave the appliance without a slot
//! that boots.

pub mod bmap;
pub mod bootenv;
pub mod build;
pub mod device;
mod extents;
pub mod flash;
pub mod install;
pub mod layout;
pub mod manifest;
