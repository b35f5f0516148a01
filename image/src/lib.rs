//! # atlasmesh-image
//!
//! Will own the appliance disk image: the A/B GPT layout, building it, bmap files, signed
//! manifests, flashing with safety checks, and self-update with boot counting. It arrives with
//! the appliance-image work and has no code yet.
//!
//! Must not: write to a device before its checks pass, or leave the appliance without a slot
//! that boots.
