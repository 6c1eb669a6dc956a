//! Embeds the shipped model configs and hardware files, so that `wafer` finds them from any directory.
use std::fmt::Write as _;
use std::path::Path;

fn collect(dir: &Path, ext: &str, prefix: &str, out: &mut Vec<(String, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    files.sort();
    for p in files {
        if p.extension().and_then(|e| e.to_str()) == Some(ext) {
            let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
            out.push((format!("{prefix}{stem}"), p.to_str().unwrap().replace('\\', "/")));
        }
    }
}

fn main() {
    println!("cargo:rerun-if-changed=models");
    println!("cargo:rerun-if-changed=models/tiny");
    println!("cargo:rerun-if-changed=models/hardware");
    let root = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    let root = Path::new(&root);
    let mut models = Vec::new();
    collect(&root.join("models"), "json", "", &mut models);
    collect(&root.join("models/tiny"), "json", "tiny/", &mut models);
    let mut hw = Vec::new();
    collect(&root.join("models/hardware"), "toml", "", &mut hw);
    let mut src = String::new();
    for (list, items) in [("MODELS", &models), ("HARDWARE", &hw)] {
        writeln!(src, "pub static {list}: &[EmbeddedFile] = &[").unwrap();
        for (name, path) in items.iter() {
            let rel = Path::new(path).strip_prefix(root).unwrap().to_str().unwrap().replace('\\', "/");
            println!("cargo:rerun-if-changed={path}");
            writeln!(src, "    EmbeddedFile {{ name: {name:?}, path: {rel:?}, text: include_str!({path:?}) }},")
                .unwrap();
        }
        writeln!(src, "];").unwrap();
    }
    let out = Path::new(&std::env::var("OUT_DIR").unwrap()).join("embedded.rs");
    std::fs::write(out, src).unwrap();
}
