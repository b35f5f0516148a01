//! Compiles the protocol with protox (pure Rust), so building needs no protoc; the descriptor
//! set is kept for gRPC reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/atlasmesh/sync/v1/sync.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("sync_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
