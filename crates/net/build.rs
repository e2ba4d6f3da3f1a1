fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Parameter chunks are encoded once per step and shared by every pull: `Bytes`, not `Vec<u8>`.
    tonic_prost_build::configure()
        .bytes(".quorum.v1.ParamsChunk.data")
        .compile_protos(&["proto/quorum.proto"], &["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&["proto/tensorboard.proto"], &["proto"])?;
    Ok(())
}
