fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `Bytes`, not `Vec<u8>`: parameter chunks are encoded once per step and shared by every
    // pull; received chunks are slices of the receive buffer rather than copies of it.
    tonic_prost_build::configure()
        .bytes(".quorum.v1.ParamsChunk.data")
        .bytes(".quorum.v1.GradientChunk.data")
        .compile_protos(&["proto/quorum.proto"], &["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&["proto/tensorboard.proto"], &["proto"])?;
    Ok(())
}
