//! The `__metadata__` of a packed file (`formats/packed.md`, section 3): format name and
//! version, the scheme, the per-layer table and the provenance, written and checked here.

use crate::error::{PackError, Result};
use crate::layout::LayerEntry;
use qat_quant::Scheme;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// `qat.format`.
pub const FORMAT_NAME: &str = "qat-packed";
/// `qat.format_version` this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

pub const KEY_FORMAT: &str = "qat.format";
pub const KEY_VERSION: &str = "qat.format_version";
pub const KEY_SCHEME: &str = "qat.scheme";
pub const KEY_LAYERS: &str = "qat.layers";
pub const KEY_PROVENANCE: &str = "qat.provenance";

/// `qat.provenance`: what made the file from what (paths are kept out of the file, so that
/// its bytes depend only on the student; `provenance.json` beside it has them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileProvenance {
    /// `qat-pack <version>`.
    pub tool: String,
    /// sha256 of the student's weight files (`ModelDir::weights_sha256`).
    pub source_weights_sha256: String,
}

/// The parsed metadata of a packed file.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMeta {
    pub scheme: Scheme,
    /// Quantized layers in model order.
    pub layers: Vec<LayerEntry>,
    pub provenance: FileProvenance,
}

impl PackedMeta {
    /// The `__metadata__` map (sorted keys; JSON values compact).
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        // Serializing plain structs to strings cannot fail.
        let json = |v: serde_json::Result<String>| v.unwrap_or_default();
        BTreeMap::from([
            (KEY_FORMAT.to_string(), FORMAT_NAME.to_string()),
            (KEY_VERSION.to_string(), FORMAT_VERSION.to_string()),
            (
                KEY_SCHEME.to_string(),
                json(serde_json::to_string(&self.scheme)),
            ),
            (
                KEY_LAYERS.to_string(),
                json(serde_json::to_string(&self.layers)),
            ),
            (
                KEY_PROVENANCE.to_string(),
                json(serde_json::to_string(&self.provenance)),
            ),
        ])
    }

    /// Parses and checks the metadata of `path`: format name, then version (before anything
    /// else), then the scheme, the layer table and the provenance.
    pub fn from_metadata(map: Option<&HashMap<String, String>>, path: &Path) -> Result<Self> {
        let err = |key, what: String| PackError::Metadata {
            path: path.to_path_buf(),
            key,
            what,
        };
        let empty = HashMap::new();
        let map = map.unwrap_or(&empty);
        let get = |key: &'static str| {
            map.get(key).ok_or_else(|| {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                err(key, format!("missing (found keys {keys:?}; is this a packed file of format {FORMAT_NAME}?)"))
            })
        };
        let format = get(KEY_FORMAT)?;
        if format != FORMAT_NAME {
            return Err(err(
                KEY_FORMAT,
                format!("found {format:?}, expected {FORMAT_NAME:?}"),
            ));
        }
        let version = get(KEY_VERSION)?;
        if version.trim() != FORMAT_VERSION.to_string() {
            return Err(err(KEY_VERSION, format!("found {version:?}, expected \"{FORMAT_VERSION}\" (this build reads version {FORMAT_VERSION})")));
        }
        let scheme = Scheme::from_json_str(get(KEY_SCHEME)?, Path::new(""))
            .map_err(|e| err(KEY_SCHEME, format!("not a valid scheme: {e}")))?;
        let layers: Vec<LayerEntry> = serde_json::from_str(get(KEY_LAYERS)?)
            .map_err(|e| err(KEY_LAYERS, format!("not a valid layer table: {e}")))?;
        let provenance: FileProvenance =
            serde_json::from_str(get(KEY_PROVENANCE)?).map_err(|e| {
                err(
                    KEY_PROVENANCE,
                    format!("not a valid provenance object: {e}"),
                )
            })?;
        Ok(Self {
            scheme,
            layers,
            provenance,
        })
    }
}
