//! The scheme file: JSON text, `quant_scheme.json` in a model directory, and `--scheme` arguments.

use crate::error::{QuantError, Result};
use crate::scheme::{Scheme, FORMAT_VERSION, SCHEME_FILE};
use std::path::{Path, PathBuf};

impl Scheme {
    /// Parses and validates the JSON form. `path` only labels errors (empty for inline JSON).
    /// The version is checked before the fields, so a newer file reports its version.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let json_err = |source| QuantError::Json {
            path: path.to_path_buf(),
            source,
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(json_err)?;
        if let Some(v) = value.get("format_version").and_then(|v| v.as_u64()) {
            if v != u64::from(FORMAT_VERSION) {
                return Err(QuantError::UnsupportedVersion {
                    found: u32::try_from(v).unwrap_or(u32::MAX),
                    expected: FORMAT_VERSION,
                });
            }
        }
        let scheme: Scheme = serde_json::from_value(value).map_err(json_err)?;
        scheme.validate()?;
        Ok(scheme)
    }

    /// The pretty-printed JSON form (what [`Scheme::save`] writes, plus a trailing newline).
    pub fn to_json_pretty(&self) -> String {
        // Serializing plain structs and enums to a string cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Reads and validates a scheme JSON file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| QuantError::Io {
            path: path.to_path_buf(),
            op: "read",
            source,
        })?;
        Self::from_json_str(&text, path)
    }

    /// Writes the scheme as pretty JSON to `path` (via a temporary file and a rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let io = |op, source| QuantError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        std::fs::write(&tmp, self.to_json_pretty() + "\n").map_err(|e| io("write", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("rename into place", e))
    }

    /// Loads `<dir>/quant_scheme.json`.
    pub fn load_from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::load(dir.as_ref().join(SCHEME_FILE))
    }

    /// Writes `<dir>/quant_scheme.json`.
    pub fn save_to_dir(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save(dir.as_ref().join(SCHEME_FILE))
    }

    /// A command-line `--scheme` value: a short name (`W4A8KV4`, case-insensitive), inline JSON,
    /// or a path to a JSON file. Strings containing `/` or `\`, or ending in `.json`, are read
    /// as files; otherwise a valid short name wins over a file of the same name, and a string
    /// that is neither reports the short-name error.
    pub fn from_arg(arg: &str) -> Result<Self> {
        let looks_like_path =
            arg.contains('/') || arg.contains('\\') || arg.to_ascii_lowercase().ends_with(".json");
        if looks_like_path && !arg.trim_start().starts_with('{') {
            return Self::load(arg);
        }
        match arg.parse() {
            Ok(scheme) => Ok(scheme),
            Err(_) if Path::new(arg).is_file() => Self::load(arg),
            Err(e) => Err(e),
        }
    }
}
