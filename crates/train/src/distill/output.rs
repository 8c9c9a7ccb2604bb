//! The finished student of `qat-distill`: a Hugging Face model directory plus scheme, training
//! log and provenance, staged inside the work directory and renamed into place whole.

use crate::error::{io, Result};
use crate::student::{save_safetensors, Student};
use qat_model::ModelDir;
use qat_quant::Scheme;
use std::path::Path;

/// Writes the student to `work/student` and renames it to `out`: weights, the init model's
/// companion files (config, tokenizer), `scheme.json`, `train_log.jsonl` (copied from
/// `log_path`) and `provenance.json`.
pub(super) fn install_student(
    work: &Path,
    out: &Path,
    student: &Student,
    init: &ModelDir,
    scheme: &Scheme,
    log_path: &Path,
    provenance: &serde_json::Value,
) -> Result<()> {
    let staging = work.join("student");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io(&staging, "cannot create"))?;
    save_safetensors(&student.tensors(), &staging.join("model.safetensors"))?;
    init.copy_companions(&staging)?;
    scheme.save(staging.join(qat_quant::SCHEME_FILE))?;
    std::fs::copy(log_path, staging.join("train_log.jsonl"))
        .map_err(io(log_path, "cannot copy"))?;
    let prov_path = staging.join("provenance.json");
    std::fs::write(
        &prov_path,
        serde_json::to_string_pretty(provenance).expect("json") + "\n",
    )
    .map_err(io(&prov_path, "cannot write"))?;
    std::fs::rename(&staging, out).map_err(io(out, "cannot move the student into place"))
}
