//! `include = ["pi/common.toml"]`: recipe parts shared by several recipes, merged into the
//! recipe before it is checked.
//!
//! A part may hold `[base]`, `[debian]`, `[[layers]]`, `[roles]` and `[boot]` (with
//! `[boot.initramfs]`), each as strict as in a recipe; an unknown key is an error naming the
//! part. Merging: the parts' layers come first (in include order), then the recipe's; `[base]`,
//! `[debian]` and `[roles]` may be defined by one file only; `[boot]` is merged key by key
//! (`files` and `initramfs` tables too), and a key set by two files is an error. So no value is
//! silently overridden. Relative paths in a part are relative to the including recipe's folder.

use super::{RawBase, RawDebian, RawLayer, RawRecipe, RawRoles};
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// The keys of a part, checked strictly (with the part's line numbers) before it is merged.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RawPart {
    base: Option<RawBase>,
    debian: Option<RawDebian>,
    #[serde(default)]
    layers: Vec<RawLayer>,
    roles: Option<RawRoles>,
    boot: Option<RawBootPart>,
}

/// The including recipe's own keys, checked strictly (with its line numbers) before merging:
/// a recipe's shape with the keys a part may supply made optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RawIncluding {
    include: Vec<String>,
    name: String,
    version: String,
    compatible: String,
    security_epoch: Option<u64>,
    signing_key: Option<String>,
    partitions: super::RawPartitions,
    base: Option<RawBase>,
    debian: Option<RawDebian>,
    #[serde(default)]
    layers: Vec<RawLayer>,
    roles: Option<RawRoles>,
    boot: Option<RawBootPart>,
}

/// `[boot]` of a part: every key optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RawBootPart {
    kernel: Option<String>,
    config_txt: Option<String>,
    cmdline: Option<String>,
    dtbs: Option<Vec<String>>,
    files: Option<BTreeMap<String, String>>,
    initramfs: Option<RawInitramfsPart>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
#[allow(dead_code)]
enum RawInitramfsPart {
    Prebuilt(String),
    Build(RawInitramfsSpecPart),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RawInitramfsSpecPart {
    init: Option<String>,
    files: Option<BTreeMap<String, String>>,
    modules_package: Option<String>,
    modules: Option<Vec<String>>,
}

/// The raw recipe of `text` (the file `file` in folder `dir`), with its includes merged; and
/// the included files, in order.
pub(super) fn raw(file: &Path, dir: &Path, text: &str) -> Result<(RawRecipe, Vec<PathBuf>)> {
    let named = |e: toml::de::Error| anyhow!("{}: {e}", file.display());
    let mut table: Table = toml::from_str(text).map_err(named)?;
    let Some(include) = table.remove("include") else {
        return Ok((toml::from_str(text).map_err(named)?, Vec::new()));
    };
    let parts = include_list(file, include)?;
    toml::from_str::<RawIncluding>(text).map_err(named)?;
    let mut merged = Table::new();
    let mut seen: Vec<String> = Vec::new();
    for part in &parts {
        let path = dir.join(part);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow!("{}: include: cannot read {}: {e}", file.display(), path.display())
        })?;
        let shown = |e: toml::de::Error| {
            anyhow!("{} (included by {}): {e}", path.display(), file.display())
        };
        toml::from_str::<RawPart>(&text).map_err(shown)?;
        let t: Table = toml::from_str(&text).map_err(shown)?;
        merge(&mut merged, t, &seen).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        seen.push(part.clone());
    }
    merge(&mut merged, table, &seen).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    let raw = Value::Table(merged).try_into().map_err(|e: toml::de::Error| {
        anyhow!("{} (with {}): {}", file.display(), parts.join(", "), e.message())
    })?;
    Ok((raw, parts.iter().map(|p| dir.join(p)).collect()))
}

/// `include`: a list of relative paths.
fn include_list(file: &Path, include: Value) -> Result<Vec<String>> {
    let bad = || {
        anyhow!(
            "{}: include: expected a list of paths such as [\"pi/common.toml\"]",
            file.display()
        )
    };
    let Value::Array(items) = include else { return Err(bad()) };
    items
        .into_iter()
        .map(|v| match v {
            Value::String(s) if !s.is_empty() => Ok(s),
            _ => Err(bad()),
        })
        .collect()
}

/// Merges the top-level table `add` into `acc`, which holds what `earlier` files defined.
fn merge(acc: &mut Table, add: Table, earlier: &[String]) -> Result<()> {
    let also = || format!("also set by {}", earlier.join(", "));
    for (key, value) in add {
        match (key.as_str(), acc.get_mut(&key)) {
            (_, None) => {
                acc.insert(key, value);
            }
            ("layers", Some(Value::Array(layers))) => match value {
                Value::Array(more) => layers.extend(more),
                _ => bail!("layers: expected [[layers]] tables"),
            },
            ("boot", Some(boot)) => merge_keys(boot, value, "boot", &also)?,
            (_, Some(_)) => bail!(
                "[{key}]: {}; a table may be defined by one file only (the recipe or one of its includes)",
                also()
            ),
        }
    }
    Ok(())
}

/// Merges `add` into `acc` key by key; a key both set (but tables, merged in turn) is an error.
fn merge_keys(acc: &mut Value, add: Value, at: &str, also: &dyn Fn() -> String) -> Result<()> {
    match (acc, add) {
        (Value::Table(acc), Value::Table(add)) => {
            for (key, value) in add {
                let here = format!("{at}.{key}");
                match acc.get_mut(&key) {
                    None => {
                        acc.insert(key, value);
                    }
                    Some(old) => merge_keys(old, value, &here, also)?,
                }
            }
            Ok(())
        }
        _ => bail!(
            "{at}: {}; a key may be set by one file only (the recipe or one of its includes)",
            also()
        ),
    }
}
