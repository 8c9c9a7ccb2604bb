//! Sanity of fake quantization on the real stories260K model: 8-bit schemes stay close to full
//! precision, aggressive ones (W2, W4A4) change the logits a lot, group formats run and lie in
//! between. Not an exactness test.

use candle_core::{DType, Device, Tensor};
use qat_model::{KvKind, LinearId, Llama, ModelDir, QuantHooks};
use qat_quant::{ActQuant, FakeQuant, Override, Scheme};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

fn data_dir() -> PathBuf {
    match std::env::var_os("QAT_DATA") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"),
    }
}

/// Loads stories260K in f32 on the CPU.
fn stories() -> (ModelDir, Llama) {
    let dir = data_dir().join("models/stories260K");
    let md = ModelDir::open(&dir).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()));
    let model = md.load(&Device::Cpu, DType::F32).expect("load stories260K");
    (md, model)
}

/// max |logits(scheme) - logits(FP)| / max |logits(FP)| over a fixed 2 × 24 token batch.
fn relative_change(
    model: &mut Llama,
    fp: &Tensor,
    tokens: &Tensor,
    scheme: &str,
    training: bool,
) -> f32 {
    let scheme: Scheme = scheme.parse().unwrap();
    scheme.validate_for(model.config()).unwrap();
    let hooks = if training {
        FakeQuant::for_training(scheme)
    } else {
        FakeQuant::for_inference(scheme)
    };
    model.set_hooks(Arc::new(hooks));
    let logits = model.forward_full(tokens).unwrap();
    let diff = (&logits - fp)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = fp
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / scale
}

#[test]
fn eight_bit_stays_close_and_low_bit_moves_far() {
    let (md, mut model) = stories();
    let ids: Vec<u32> = (0..48u32).map(|i| 1 + (i * 37 + 11) % 500).collect();
    let tokens = Tensor::from_vec(ids, (2, 24), &Device::Cpu).unwrap();
    let fp = model.forward_full(&tokens).unwrap();
    let fp_again = relative_change(&mut model, &fp, &tokens, "FP", false);
    assert_eq!(fp_again, 0.0, "FP scheme must not change anything");
    let w8a8kv8 = relative_change(&mut model, &fp, &tokens, "W8A8KV8", false);
    let w8a8kv8_train = relative_change(&mut model, &fp, &tokens, "W8A8KV8", true);
    let w4a4 = relative_change(&mut model, &fp, &tokens, "W4A4", false);
    let w2 = relative_change(&mut model, &fp, &tokens, "W2", false);
    eprintln!("relative max |Δlogits|: W8A8KV8 {w8a8kv8:.4}, W4A4 {w4a4:.4}, W2 {w2:.4}");
    assert_eq!(
        w8a8kv8, w8a8kv8_train,
        "training hooks must give the same values"
    );
    assert!(w8a8kv8 < 0.08, "W8A8KV8 moved logits by {w8a8kv8}");
    assert!(
        w4a4 > 5.0 * w8a8kv8 && w4a4 > 0.2,
        "W4A4 {w4a4} vs W8A8KV8 {w8a8kv8}"
    );
    assert!(
        w2 > 5.0 * w8a8kv8 && w2 > 0.2,
        "W2 {w2} vs W8A8KV8 {w8a8kv8}"
    );
    // BitDistiller's formats: groups of 4 fit every layer (in = 64, or 172 = 4·43 for down_proj).
    for name in ["W4G4", "W3CH", "NF3G4", "NF4G4"] {
        let d = relative_change(&mut model, &fp, &tokens, name, false);
        let d_train = relative_change(&mut model, &fp, &tokens, name, true);
        eprintln!("relative max |Δlogits|: {name} {d:.4}");
        assert_eq!(
            d, d_train,
            "{name}: training hooks must give the same values"
        );
        assert!(d > 0.0 && d < w2, "{name} {d} vs W2 {w2}");
    }
    assert!(Scheme::from_arg("W3G32")
        .unwrap()
        .validate_for(&md.config)
        .is_err());
    assert!(Scheme::from_arg("W4A8KV4")
        .unwrap()
        .validate_for(&md.config)
        .is_ok());
}

/// max |a - b| over all elements.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn quantized_kv_cache_decodes_like_the_full_forward_per_token_and_per_head() {
    // KV scales are per position (and head), so a cache filled chunk by chunk holds exactly the
    // values the full forward quantizes: incremental logits equal full ones (f64, to rounding).
    let dir = data_dir().join("models/stories260K");
    let md = ModelDir::open(&dir).unwrap();
    let mut model = md.load(&Device::Cpu, DType::F64).unwrap();
    let seq: Vec<u32> = (0..40u32).map(|i| 1 + (i * 37) % 500).collect();
    let tokens = Tensor::from_vec(seq.clone(), (1, 40), &Device::Cpu).unwrap();
    let fp = model.forward_full(&tokens).unwrap();
    let mut full_by_scheme = Vec::new();
    for name in ["W4A8KV4", "W4A8KV4H"] {
        model.set_hooks(Arc::new(FakeQuant::for_inference(name.parse().unwrap())));
        let full = model.forward_full(&tokens).unwrap();
        let mut cache = model.new_cache(vec![0]);
        let mut chunks = Vec::new();
        for (start, len) in [(0usize, 9usize), (9, 1), (10, 4), (14, 26)] {
            let x =
                Tensor::from_vec(seq[start..start + len].to_vec(), (1, len), &Device::Cpu).unwrap();
            chunks.push(model.forward(&x, &mut cache).unwrap());
        }
        let incremental = Tensor::cat(&chunks, 1).unwrap();
        let d = max_abs_diff(&full, &incremental);
        assert!(d < 1e-9, "{name}: max |full - incremental| = {d}");
        assert!(
            max_abs_diff(&full, &fp) > 0.1,
            "{name} should move the logits"
        );
        full_by_scheme.push(full);
    }
    // Per-head scales are a different quantizer: the logits differ from per-token ones.
    let d = max_abs_diff(&full_by_scheme[0], &full_by_scheme[1]);
    assert!(
        d > 1e-3,
        "per-token and per-head KV scales gave the same logits (max diff {d})"
    );
}

/// [`FakeQuant`] that counts its activation calls per block; with `share: false` it never lets
/// layers share a quantized input, so every linear layer quantizes its own.
#[derive(Debug)]
struct CountingActivations {
    inner: FakeQuant,
    share: bool,
    calls: Mutex<Vec<usize>>,
}

impl QuantHooks for CountingActivations {
    fn weight(&self, id: LinearId, w: &Tensor) -> candle_core::Result<Tensor> {
        self.inner.weight(id, w)
    }
    fn activation(&self, id: LinearId, x: &Tensor) -> candle_core::Result<Tensor> {
        self.calls.lock().unwrap()[id.layer] += 1;
        self.inner.activation(id, x)
    }
    fn same_activation(&self, a: LinearId, b: LinearId) -> bool {
        self.share && self.inner.same_activation(a, b)
    }
    fn kv(&self, layer: usize, kind: KvKind, x: &Tensor) -> candle_core::Result<Tensor> {
        self.inner.kv(layer, kind, x)
    }
}

#[test]
fn layers_with_one_activation_quantizer_share_one_quantized_input() {
    // W4A8KV4, but layer 1's q_proj reads A4 and layer 2's up_proj reads FP: those two must
    // quantize their own input; every other q/k/v and gate/up group quantizes once.
    let scheme: Scheme = "W4A8KV4".parse().unwrap();
    let scheme = scheme
        .with_override(Override {
            pattern: "layers.1.self_attn.q_proj".into(),
            weight: None,
            act: Some(Some(ActQuant { bits: 4 })),
        })
        .with_override(Override {
            pattern: "layers.2.mlp.up_proj".into(),
            weight: None,
            act: Some(None),
        });
    let (_, mut model) = stories();
    let layers = model.config().num_layers;
    let tokens = Tensor::new(&[[1u32, 400, 37, 81, 9, 250, 3, 77]], &Device::Cpu).unwrap();
    let mut run = |share: bool| {
        let hooks = Arc::new(CountingActivations {
            inner: FakeQuant::for_training(scheme.clone()),
            share,
            calls: Mutex::new(vec![0; layers]),
        });
        model.set_hooks(hooks.clone());
        let logits = model.forward_full(&tokens).unwrap();
        let calls = hooks.calls.lock().unwrap().clone();
        (
            logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            calls,
        )
    };
    let (separate, calls_separate) = run(false);
    let (shared, calls_shared) = run(true);
    assert_eq!(calls_separate, vec![7; layers]);
    let mut want = vec![4; layers]; // {q,k,v}, o, {gate,up}, down
    want[1] = 5; // q | {k,v}
    want[2] = 5; // gate | up
    assert_eq!(calls_shared, want);
    assert_eq!(shared, separate, "sharing an input changed the logits");
    // The overrides matter: without them the logits differ.
    model.set_hooks(Arc::new(FakeQuant::for_training(
        "W4A8KV4".parse().unwrap(),
    )));
    let plain = model.forward_full(&tokens).unwrap();
    assert_ne!(
        plain.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        shared
    );
}
