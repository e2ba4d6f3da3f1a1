fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The .proto files are parsed by protox, a protobuf compiler written in Rust, so the build
    // needs no system `protoc`.
    let quorum = protox::compile(["proto/quorum.proto"], ["proto"])?;
    let tensorboard = protox::compile(["proto/tensorboard.proto"], ["proto"])?;
    // `Bytes`, not `Vec<u8>`: parameter chunks are encoded once per step and shared by every
    // pull; received chunks are slices of the receive buffer rather than copies of it.
    tonic_prost_build::configure()
        .bytes(".quorum.v1.ParamsChunk.data")
        .bytes(".quorum.v1.GradientChunk.data")
        .compile_fds(quorum)?;
    tonic_prost_build::configure().build_client(false).build_server(false).compile_fds(tensorboard)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
