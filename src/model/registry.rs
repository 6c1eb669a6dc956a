//! The model configs and hardware files shipped in `models/`, embedded at build time (see `build.rs`).

/// One shipped file: its lookup name (`gpt2-small`, `tiny/gpt-tiny`, `wse2`), its path in the
/// repository (used in error messages) and its text.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddedFile {
    pub name: &'static str,
    pub path: &'static str,
    pub text: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/embedded.rs"));

/// Every shipped model config, sorted by name (`models/*.json`, then `models/tiny/*.json`).
pub fn embedded_models() -> &'static [EmbeddedFile] {
    MODELS
}

/// Every shipped hardware file (`models/hardware/*.toml`), sorted by name.
pub fn embedded_hardware() -> &'static [EmbeddedFile] {
    HARDWARE
}

/// Finds a shipped model by name; tiny models answer to `gpt-tiny` as well as `tiny/gpt-tiny`,
/// and `models/<name>.json` paths resolve to the embedded copy when no such file is on disk.
pub(crate) fn find_model(arg: &str) -> Option<EmbeddedFile> {
    let key = arg.trim_start_matches("./").trim_start_matches("models/").trim_end_matches(".json");
    MODELS
        .iter()
        .find(|f| f.name == key)
        .or_else(|| MODELS.iter().find(|f| f.name.strip_prefix("tiny/") == Some(key)))
        .copied()
}
