//! Embeds the checked-in Avro schemas (`avro/**/*.avsc`) and the proto
//! sources (`../proto/**/*.proto`) with `include_str!`, so that the catalog
//! and the registry's PROTOBUF subjects need no file at run time.

use std::{
    env,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let avro = root.join("avro");
    let proto = root.join("..").join("proto");
    println!("cargo:rerun-if-changed={}", avro.display());
    println!("cargo:rerun-if-changed={}", proto.display());

    let mut code = String::new();
    for (name, dir, ext) in [("AVRO_FILES", &avro, "avsc"), ("PROTO_SOURCES", &proto, "proto")] {
        let mut files = Vec::new();
        if dir.is_dir() {
            collect(dir, ext, &mut files)?;
        }
        files.sort();
        writeln!(code, "pub(crate) const {name}: &[(&str, &str)] = &[")?;
        for file in files {
            let relative = file.strip_prefix(dir)?.to_str().ok_or("non-UTF-8 path")?.replace('\\', "/");
            let absolute = file.canonicalize()?;
            writeln!(code, "    ({relative:?}, include_str!({:?})),", absolute.to_str().ok_or("non-UTF-8 path")?)?;
        }
        writeln!(code, "];")?;
    }
    fs::write(out.join("embedded.rs"), code)?;
    Ok(())
}

fn collect(dir: &Path, ext: &str, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            // The proto crate's own sources and build output are not protos.
            if path.file_name().is_some_and(|n| n == "src" || n == "target") {
                continue;
            }
            collect(&path, ext, files)?;
        } else if path.extension().is_some_and(|e| e == ext) {
            files.push(path);
        }
    }
    Ok(())
}
