//! Disk health of the depot's own disks: smartctl's JSON read into typed structs
//! ([`smartctl`]) and judged with reasons ([`verdict`]). Both are pure; the collector that runs
//! smartctl, the history, alerts and the API build on them.

pub mod smartctl;
pub mod verdict;
