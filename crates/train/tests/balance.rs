//! K/V rebalancing must not change the full-precision model (stories260K), and must even out
//! the K channel maxima that per-token KV quantization shares one scale across.

use candle_core::{DType, Device, Tensor};
use qat_model::ModelDir;
use qat_train::{balance::balance_kv, Student};
use std::path::PathBuf;

fn stories() -> PathBuf {
    match std::env::var_os("QAT_DATA") {
        Some(d) => PathBuf::from(d).join("models/stories260K"),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/data/models/stories260K"),
    }
}

#[test]
fn balancing_preserves_full_precision_logits() {
    let md = ModelDir::open(stories()).unwrap();
    let dev = Device::Cpu;
    let reference = md.load(&dev, DType::F32).unwrap();
    let mut student = Student::load(&md, &dev).unwrap();
    let tok = md.tokenizer().unwrap();
    let calib: Vec<Vec<u32>> = [
        "Once upon a time there was a little dog named Max.",
        "Lily liked to play in the park with her red ball.",
    ]
    .iter()
    .map(|t| tok.encode(*t, true).unwrap().get_ids().to_vec())
    .collect();
    let report = balance_kv(&mut student, &calib).unwrap();
    assert!(report.k_max_over_mean_before > 1.2, "{report:?}");
    let ids = tok
        .encode(
            "The cat sat on the mat and looked at the bird in the tree.",
            true,
        )
        .unwrap()
        .get_ids()
        .to_vec();
    let x = Tensor::from_vec(ids.clone(), (1, ids.len()), &dev).unwrap();
    let a = reference.forward_full(&x).unwrap();
    let b = student.model.forward_full(&x).unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-4, "balancing changed FP logits by {diff}");
    // The weights did change.
    let w0 = reference.linears()[1]
        .weight()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let w1 = student.model.linears()[1]
        .weight()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(w0, w1);
}
