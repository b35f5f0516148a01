//! # atlasmesh-ota-staging
//!
//! Will own release trust (the TUF image repository and the depot's director repository), the
//! single-pass verified staging pipeline, the content-addressed chunk store, range serving,
//! delta planning and garbage collection. It arrives with the OTA staging work and has no code
//! yet; nothing in the depot claims to stage images until it does.
//!
//! Must not: make anything visible to vehicles before every signature and hash has verified,
//! or read the wall clock inside trust decisions (time is passed in).
