//! Loading hardware descriptions: `--hw NAME` (a shipped `models/hardware/NAME.toml`) or a path,
//! `extends = "base"` inheritance, `--set key=value` overrides, then typed deserialisation with
//! `deny_unknown_fields`. Every error names the file and the dotted key.

use serde::de::DeserializeOwned;
use toml::Value;

use super::HwError;
use crate::model::embedded_hardware;

/// Depth limit for `extends` chains (guards against cycles).
const MAX_EXTENDS: usize = 8;

/// A hardware description as a TOML tree, after inheritance and overrides, with where it came from.
#[derive(Clone, Debug)]
pub struct HwDoc {
    /// The name given (`wse2`) or the file stem of a path.
    pub name: String,
    /// The file the description came from (`models/hardware/wse2.toml`), for error messages.
    pub path: String,
    pub tree: toml::Table,
}

/// Reads the text of a shipped description (by name) or of a file (by path).
fn read(arg: &str) -> Result<(String, String, String), HwError> {
    let looks_like_path = arg.ends_with(".toml") || arg.contains('/') || arg.contains('\\');
    if looks_like_path || std::path::Path::new(arg).is_file() {
        let text =
            std::fs::read_to_string(arg).map_err(|e| HwError::Read { path: arg.into(), message: e.to_string() })?;
        let name = std::path::Path::new(arg).file_stem().and_then(|s| s.to_str()).unwrap_or(arg).to_string();
        return Ok((name, arg.to_string(), text));
    }
    match embedded_hardware().iter().find(|f| f.name == arg) {
        Some(f) => Ok((f.name.to_string(), f.path.to_string(), f.text.to_string())),
        None => Err(HwError::Unknown {
            name: arg.into(),
            known: embedded_hardware().iter().map(|f| f.name).collect::<Vec<_>>().join(", "),
        }),
    }
}

fn parse(path: &str, text: &str) -> Result<toml::Table, HwError> {
    text.parse::<toml::Table>().map_err(|e| HwError::Parse { path: path.into(), message: e.to_string() })
}

/// Merges `over` into `base`: tables merge key by key, everything else is replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Loads a description with its `extends` resolved: `extends = "base"` or a list, merged in order
/// (later bases over earlier ones), with the file's own keys over all of them.
pub fn load_doc(arg: &str) -> Result<HwDoc, HwError> {
    let (name, path, text) = read(arg)?;
    let tree = resolve(&name, &path, parse(&path, &text)?, &mut vec![name.clone()])?;
    Ok(HwDoc { name, path, tree })
}

fn resolve(name: &str, path: &str, mut tree: toml::Table, chain: &mut Vec<String>) -> Result<toml::Table, HwError> {
    let Some(ext) = tree.remove("extends") else {
        return Ok(tree);
    };
    let bases: Vec<String> = match ext {
        Value::String(s) => vec![s],
        Value::Array(a) if a.iter().all(|v| v.is_str()) => {
            a.iter().filter_map(|v| v.as_str().map(String::from)).collect()
        }
        _ => {
            return Err(HwError::Key {
                path: path.into(),
                key: "extends".into(),
                message: "expected a hardware name or a list of names".into(),
            })
        }
    };
    let mut merged = toml::Table::new();
    for base in bases {
        if chain.len() > MAX_EXTENDS || chain.contains(&base) {
            return Err(HwError::Key {
                path: path.into(),
                key: "extends".into(),
                message: format!("inheritance cycle or chain too long: {} -> {base} (in {name})", chain.join(" -> ")),
            });
        }
        chain.push(base.clone());
        let (base_name, base_path, base_text) = read(&base)?;
        let parent = resolve(&base_name, &base_path, parse(&base_path, &base_text)?, chain)?;
        chain.pop();
        merge(&mut merged, parent);
    }
    merge(&mut merged, tree);
    Ok(merged)
}

/// Splits `key=value` and applies it to the tree. The key must already exist (a typo is an error, not
/// a silently ignored setting); the value is parsed as TOML (`98304`, `1.1e9`, `"name"`, `true`).
pub fn apply_override(doc: &mut HwDoc, setting: &str) -> Result<(), HwError> {
    let bad = |message: String| HwError::Set { setting: setting.into(), message };
    let (key, raw) = setting.split_once('=').ok_or_else(|| bad("expected KEY=VALUE".into()))?;
    let key = key.trim();
    let value: Value = match format!("v = {}", raw.trim()).parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or(Value::Boolean(false)),
        // A bare word is taken as a string, so `--set gpu.name=foo` works without quotes.
        Err(_) => Value::String(raw.trim().to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let mut table = &mut doc.tree;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let known = table.keys().cloned().collect::<Vec<_>>().join(", ");
        let Some(slot) = table.get_mut(*part) else {
            return Err(bad(format!("{}: no key `{}` here (known: {known})", doc.path, parts[..=i].join("."))));
        };
        if last {
            if std::mem::discriminant(slot) != std::mem::discriminant(&value)
                && !matches!((&*slot, &value), (Value::Float(_), Value::Integer(_)))
            {
                return Err(bad(format!("`{key}` is a {}, not a {}", slot.type_str(), value.type_str())));
            }
            *slot = match (&*slot, value) {
                (Value::Float(_), Value::Integer(i)) => Value::Float(i as f64),
                (_, v) => v,
            };
            return Ok(());
        }
        match slot {
            Value::Table(t) => table = t,
            other => return Err(bad(format!("`{}` is a {}, not a table", parts[..=i].join("."), other.type_str()))),
        }
    }
    Ok(())
}

/// Deserialises a (sub)tree into a typed description; unknown and missing keys are errors naming the key.
pub fn decode<T: DeserializeOwned>(doc: &HwDoc, table: &toml::Table) -> Result<T, HwError> {
    T::deserialize(Value::Table(table.clone()))
        .map_err(|e| HwError::Parse { path: doc.path.clone(), message: e.to_string() })
}

/// Loads `arg`, applies the overrides in order, and returns the tree.
pub fn load_with_overrides(arg: &str, overrides: &[String]) -> Result<HwDoc, HwError> {
    let mut doc = load_doc(arg)?;
    for s in overrides {
        apply_override(&mut doc, s)?;
    }
    Ok(doc)
}

/// The `kind` key every description carries (`wafer`, `gpu`, `cluster`, ...).
pub fn kind(doc: &HwDoc) -> Result<String, HwError> {
    match doc.tree.get("kind") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => {
            Err(HwError::Key { path: doc.path.clone(), key: "kind".into(), message: "expected a string".into() })
        }
        None => Err(HwError::Key { path: doc.path.clone(), key: "kind".into(), message: "missing".into() }),
    }
}
