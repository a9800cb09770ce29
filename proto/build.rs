//! Compiles the protobuf files with a vendored protoc so no system protoc is
//! needed: `tern.proto` always, `internal.proto` (tonic services) with the
//! `rpc` feature.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tern.proto");
    println!("cargo:rerun-if-changed=proto/internal.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(&protoc);
    config.compile_protos(&["proto/tern.proto"], &["proto"])?;

    #[cfg(feature = "rpc")]
    {
        let mut config = prost_build::Config::new();
        config.protoc_executable(&protoc);
        // Pushed messages are passed on as they are: `Bytes` clones share
        // the buffer where `Vec<u8>` would copy it per push.
        config.bytes([".tern.internal.v1.PushItem.message"]);
        tonic_prost_build::configure().extern_path(".tern.v1", "crate::pb").compile_with_config(
            config,
            &["proto/internal.proto"],
            &["proto"],
        )?;
    }
    Ok(())
}
