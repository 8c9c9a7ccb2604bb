//! [`pack`]: a student directory (model dir + `quant_scheme.json`) in, a packed model directory
//! (`formats/packed.md`) out, written as `<out>.partial/` and renamed into place.

use crate::bits::pack_rows;
use crate::error::{PackError, Result};
use crate::layout::{plain_tensors, quantized_layers, QuantLayer, PACKED_FILE};
use crate::meta::{FileProvenance, PackedMeta};
use crate::size::SizeReport;
use crate::st::{self, OwnedTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::Device;
use qat_model::{sha256_files, ModelDir, COMPANION_FILES};
use qat_quant::{quantize_codes, Scheme, SCHEME_FILE};
use safetensors::Dtype;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// `qat-pack <version>`, recorded in every packed file.
pub const TOOL: &str = concat!("qat-pack ", env!("CARGO_PKG_VERSION"));

/// What [`pack`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct PackSummary {
    /// The packed model directory.
    pub out: PathBuf,
    /// Its packed weights file.
    pub file: PathBuf,
    /// Size of the packed weights file.
    pub bytes: u64,
    /// Size of all files of the packed directory.
    pub dir_bytes: u64,
    /// Size of the student's weight files.
    pub source_bytes: u64,
    #[serde(flatten)]
    pub size: SizeReport,
    /// Linear layers the scheme leaves in full precision (stored as they are).
    pub full_precision_layers: usize,
    /// The scheme's short name, or its compact JSON.
    pub scheme: String,
    pub packed_sha256: String,
    pub source_weights_sha256: String,
    pub tool: String,
}

fn scheme_err(path: &Path, what: &str) -> impl FnOnce(qat_quant::QuantError) -> PackError {
    let (path, what) = (path.to_path_buf(), what.to_string());
    move |e| PackError::Scheme {
        path,
        what,
        source: Some(Box::new(e)),
    }
}

/// Packs the student in `student` into a new directory `out`.
///
/// Every linear layer the student's `quant_scheme.json` quantizes (per layer, after overrides)
/// is stored as its integer codes ([`quantize_codes`]) bit-packed, with f16 scales and u8 zero
/// points; every other tensor is kept in its source dtype. Fails if `out` exists.
pub fn pack(student: &Path, out: &Path) -> Result<PackSummary> {
    if out.exists() {
        return Err(PackError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    let dir = ModelDir::open(student)?;
    let scheme_path = student.join(SCHEME_FILE);
    if !scheme_path.is_file() {
        let what = format!("missing: a student directory has a {SCHEME_FILE} (copy a scheme file there to pack a model directly)");
        return Err(PackError::Scheme {
            path: scheme_path,
            what,
            source: None,
        });
    }
    let scheme = Scheme::load(&scheme_path).map_err(scheme_err(&scheme_path, "invalid scheme"))?;
    scheme.validate_for(&dir.config).map_err(scheme_err(
        &scheme_path,
        "the scheme does not fit the model",
    ))?;
    let layers =
        quantized_layers(&dir.config, &scheme).map_err(|(layer, what)| PackError::Scheme {
            path: scheme_path.clone(),
            what: format!("{layer}: {what}"),
            source: None,
        })?;
    if layers.is_empty() {
        return Err(PackError::NothingToPack { path: scheme_path });
    }
    let source_weights_sha256 = dir.weights_sha256()?;
    let (tensors, size) = pack_tensors(&dir, &layers)?;
    let meta = PackedMeta {
        scheme: scheme.clone(),
        layers: layers.iter().map(|l| l.entry.clone()).collect(),
        provenance: FileProvenance {
            tool: TOOL.to_string(),
            source_weights_sha256: source_weights_sha256.clone(),
        },
    };

    let partial = PathBuf::from(format!("{}.partial", out.display()));
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .map_err(PackError::io(&partial, "remove stale partial output"))?;
    }
    std::fs::create_dir_all(&partial).map_err(PackError::io(&partial, "create"))?;
    // A failure from here on (e.g. a full disk) removes the partial directory: nothing
    // half-written is left behind.
    let written = (|| -> Result<PackSummary> {
        for name in COMPANION_FILES {
            let src = student.join(name);
            if src.is_file() {
                copy_synced(&src, &partial.join(name))?;
            }
        }
        scheme
            .save_to_dir(&partial)
            .map_err(scheme_err(&partial.join(SCHEME_FILE), "cannot write"))?;
        let file = partial.join(PACKED_FILE);
        let bytes = st::write(&file, &meta.to_metadata(), tensors)?;
        let packed_sha256 = sha256_files(std::slice::from_ref(&file))?;
        let source_bytes = dir
            .weight_files
            .iter()
            .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
            .sum();
        let mut summary = PackSummary {
            out: out.to_path_buf(),
            file: out.join(PACKED_FILE),
            bytes,
            dir_bytes: 0,
            source_bytes,
            size,
            full_precision_layers: dir.config.num_layers * 7 - layers.len(),
            scheme: scheme.short_name().unwrap_or_else(|| scheme.to_string()),
            packed_sha256,
            source_weights_sha256,
            tool: TOOL.to_string(),
        };
        write_provenance(student, &partial, &summary)?;
        summary.dir_bytes = dir_bytes(&partial)?;
        sync_dir(&partial)?;
        Ok(summary)
    })();
    let summary = match written {
        Ok(summary) => summary,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, out).map_err(PackError::io(
        out,
        "rename the finished directory into place",
    ))?;
    if let Some(parent) = out.parent() {
        sync_dir(parent)?;
    }
    Ok(summary)
}

/// The tensors of the packed file and their size report.
fn pack_tensors(dir: &ModelDir, layers: &[QuantLayer]) -> Result<(Vec<OwnedTensor>, SizeReport)> {
    // SAFETY: the student's weight files are mapped read-only while we copy out of them.
    let st = unsafe { MmapedSafetensors::multi(&dir.weight_files)? };
    let mut size = SizeReport::default();
    let mut tensors = Vec::new();
    for (name, _) in plain_tensors(&dir.config, layers) {
        let view = st.get(&name)?;
        size.add_other(view.data().len());
        tensors.push(OwnedTensor {
            name,
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: view.data().to_vec(),
        });
    }
    for l in layers {
        let e = &l.entry;
        let w = st.load(&l.id.weight_key(), &Device::Cpu)?;
        let c = quantize_codes(&w, &l.wq)?;
        let qweight = pack_rows(&c.codes, e.in_features, e.bits);
        let scales: Vec<u8> = c.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        let zeros = c.zeros.unwrap_or_default();
        size.add_layer(e, qweight.len(), scales.len(), zeros.len());
        tensors.push(OwnedTensor {
            name: e.qweight_name(),
            dtype: Dtype::U8,
            shape: e.qweight_shape(),
            data: qweight,
        });
        tensors.push(OwnedTensor {
            name: e.scales_name(),
            dtype: Dtype::F16,
            shape: e.scales_shape(),
            data: scales,
        });
        if e.has_zeros() {
            tensors.push(OwnedTensor {
                name: e.zeros_name(),
                dtype: Dtype::U8,
                shape: e.zeros_shape(),
                data: zeros,
            });
        }
    }
    Ok((tensors, size))
}

/// `provenance.json`: tool, source, hashes, the student's own provenance and the sizes.
fn write_provenance(student: &Path, dir: &Path, summary: &PackSummary) -> Result<()> {
    let src = student.join("provenance.json");
    let source_provenance = match std::fs::read_to_string(&src) {
        Ok(text) => serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        Err(_) => serde_json::Value::Null,
    };
    let p = serde_json::json!({
        "tool": TOOL,
        "source": student.display().to_string(),
        "source_weights_sha256": summary.source_weights_sha256,
        "source_provenance": source_provenance,
        "packed_file": PACKED_FILE,
        "packed_sha256": summary.packed_sha256,
        "bytes": summary.bytes,
        "sizes": summary.size,
        "scheme": summary.scheme,
    });
    let path = dir.join("provenance.json");
    let text = serde_json::to_string_pretty(&p).unwrap_or_default() + "\n";
    std::fs::write(&path, text).map_err(PackError::io(&path, "write"))?;
    std::fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .map_err(PackError::io(&path, "fsync"))
}

/// Copies the bytes (not the permissions: the source may be read-only) and fsyncs.
fn copy_synced(src: &Path, dst: &Path) -> Result<()> {
    let bytes = std::fs::read(src).map_err(PackError::io(src, "read"))?;
    std::fs::write(dst, bytes).map_err(PackError::io(dst, "write"))?;
    std::fs::File::open(dst)
        .and_then(|f| f.sync_all())
        .map_err(PackError::io(dst, "fsync"))
}

fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(PackError::io(dir, "fsync directory"))
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).map_err(PackError::io(dir, "list"))? {
        let e = e.map_err(PackError::io(dir, "list"))?;
        total += e.metadata().map_err(PackError::io(e.path(), "stat"))?.len();
    }
    Ok(total)
}
