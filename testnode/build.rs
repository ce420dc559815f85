//! Compiles the CRI API (runtime.v1) into a tonic client. protox parses the
//! proto in Rust, so no `protoc` has to be installed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/cri-api-v1.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
