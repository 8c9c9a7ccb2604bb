//! The scheme as a file format: JSON round trips, strict parsing, overrides, validation against a
//! model config, `from_arg`, and the hooks' per-layer resolution.

use candle_core::{Device, Tensor, Var};
use qat_model::{KvKind, LinearId, LinearKind, LlamaConfig, QuantHooks};
use qat_quant::{
    ActQuant, FakeQuant, KvQuant, LayerQuant, Override, Scheme, WeightFormat, WeightGrad,
    WeightQuant, SCHEME_FILE,
};

fn cfg(layers: usize) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 64,
        intermediate_size: 172,
        num_layers: layers,
        num_heads: 8,
        num_kv_heads: 4,
        head_dim: 8,
        vocab_size: 512,
        max_position_embeddings: 512,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        tie_word_embeddings: true,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

fn id(layer: usize, kind: LinearKind) -> LinearId {
    LinearId { layer, kind }
}

const W4A8KV4_JSON: &str = r#"{
  "format_version": 1,
  "weight": { "bits": 4, "format": { "kind": "sym_per_channel" } },
  "act": { "bits": 8 },
  "kv": { "bits": 4 },
  "overrides": []
}"#;

#[test]
fn json_form_matches_the_spec_example_and_round_trips() {
    let s: Scheme = "W4A8KV4".parse().unwrap();
    assert_eq!(
        Scheme::from_json_str(W4A8KV4_JSON, "spec".as_ref()).unwrap(),
        s
    );
    let as_value = |t: &str| serde_json::from_str::<serde_json::Value>(t).unwrap();
    assert_eq!(as_value(&s.to_json_pretty()), as_value(W4A8KV4_JSON));
    let back = Scheme::from_json_str(&s.to_json_pretty(), "x".as_ref()).unwrap();
    assert_eq!(back, s);
    // Missing "overrides" defaults to none; null quantizers mean full precision.
    let fp = Scheme::from_json_str(
        r#"{"format_version":1,"weight":null,"act":null,"kv":null}"#,
        "".as_ref(),
    )
    .unwrap();
    assert_eq!(fp, Scheme::full_precision());
}

#[test]
fn kv_granularity_is_written_only_when_per_head() {
    // Per token (LLM-QAT) keeps the version-1 JSON of earlier builds byte for byte: no new field.
    let per_token: Scheme = "W4A8KV4".parse().unwrap();
    assert!(!per_token.to_json_pretty().contains("granularity"));
    let per_head: Scheme = "W4A8KV4H".parse().unwrap();
    assert_eq!(per_head.kv, Some(KvQuant::per_head(4)));
    let text = per_head.to_json_pretty();
    assert!(text.contains(r#""granularity": "head""#), "{text}");
    assert_eq!(Scheme::from_json_str(&text, "".as_ref()).unwrap(), per_head);
    let explicit = W4A8KV4_JSON.replace(
        r#""kv": { "bits": 4 }"#,
        r#""kv": { "bits": 4, "granularity": "token" }"#,
    );
    assert_eq!(
        Scheme::from_json_str(&explicit, "".as_ref()).unwrap(),
        per_token
    );
    let bad = W4A8KV4_JSON.replace(
        r#""kv": { "bits": 4 }"#,
        r#""kv": { "bits": 4, "granularity": "channel" }"#,
    );
    let e = Scheme::from_json_str(&bad, "m/quant_scheme.json".as_ref())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown variant `channel`, expected `token` or `head`"),
        "{e}"
    );
}

#[test]
fn unknown_formats_fields_and_versions_are_clear_errors() {
    let err = |j: &str| {
        Scheme::from_json_str(j, "m/quant_scheme.json".as_ref())
            .unwrap_err()
            .to_string()
    };
    let nf5 = W4A8KV4_JSON.replace(r#"{ "kind": "sym_per_channel" }"#, r#"{ "kind": "nf5" }"#);
    let e = err(&nf5);
    assert!(e.starts_with("m/quant_scheme.json: invalid scheme JSON: unknown variant `nf5`, expected one of `sym_per_channel`, `asym_group`, `nf3`, `nf4`"), "{e}");
    let extra = W4A8KV4_JSON.replace(
        r#""sym_per_channel" }"#,
        r#""sym_per_channel", "group_size": 128 }"#,
    );
    let e = err(&extra);
    assert!(e.contains("unknown field `group_size`"), "{e}");
    let e = err(&W4A8KV4_JSON.replace("\"act\"", "\"acts\""));
    assert!(e.contains("unknown field `acts`"), "{e}");
    let e = err(&W4A8KV4_JSON.replace("\"format_version\": 1", "\"format_version\": 2"));
    assert_eq!(
        e,
        "unsupported scheme format_version 2 (this build reads version 1)"
    );
    let e = err(&W4A8KV4_JSON.replace("\"bits\": 4, \"format\"", "\"bits\": 9, \"format\""));
    assert_eq!(e, "weight bits 9 out of range 2..=8");
    let e = err(&W4A8KV4_JSON.replace("\"format_version\": 1,", ""));
    assert!(e.contains("missing field `format_version`"), "{e}");
    let e = err(&W4A8KV4_JSON.replace(", \"format\": { \"kind\": \"sym_per_channel\" }", ""));
    assert!(e.contains("missing field `format`"), "{e}");
}

#[test]
fn overrides_resolve_in_order_and_null_disables() {
    // Base W4A8; then: block 0 fully FP; every down_proj weights at 8 bits; layers.0.mlp.down_proj
    // weights back to 2 bits (later wins over both earlier ones); activations untouched by #1.
    let json = r#"{
      "format_version": 1,
      "weight": { "bits": 4, "format": { "kind": "sym_per_channel" } },
      "act": { "bits": 8 },
      "kv": null,
      "overrides": [
        { "pattern": "layers.0.*", "weight": null, "act": null },
        { "pattern": "layers.*.mlp.down_proj", "weight": { "bits": 8, "format": { "kind": "sym_per_channel" } } },
        { "pattern": "layers.0.mlp.down_proj", "weight": { "bits": 2, "format": { "kind": "sym_per_channel" } } }
      ]
    }"#;
    let s = Scheme::from_json_str(json, "".as_ref()).unwrap();
    let (w, a) = (
        |b| Some(WeightQuant::sym_per_channel(b)),
        Some(ActQuant { bits: 8 }),
    );
    assert_eq!(
        s.resolve(id(0, LinearKind::Q)),
        LayerQuant {
            weight: None,
            act: None
        }
    );
    assert_eq!(
        s.resolve(id(0, LinearKind::Down)),
        LayerQuant {
            weight: w(2),
            act: None
        }
    );
    assert_eq!(
        s.resolve(id(1, LinearKind::Down)),
        LayerQuant {
            weight: w(8),
            act: a
        }
    );
    assert_eq!(
        s.resolve(id(1, LinearKind::Up)),
        LayerQuant {
            weight: w(4),
            act: a
        }
    );
    // Absent fields stay absent when written back; null stays null.
    let text = s.to_json_pretty();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        v["overrides"][0]["weight"].is_null() && v["overrides"][0]["act"].is_null(),
        "{text}"
    );
    assert!(v["overrides"][1].get("act").is_none(), "{text}");
    assert_eq!(Scheme::from_json_str(&text, "".as_ref()).unwrap(), s);
    // No short name with overrides: Display writes compact JSON, which parses back.
    assert_eq!(s.short_name(), None);
    let shown = s.to_string();
    assert!(shown.starts_with("{\"format_version\":1"), "{shown}");
    assert_eq!(shown.parse::<Scheme>().unwrap(), s);
    s.validate_for(&cfg(5)).unwrap();
}

#[test]
fn validate_for_names_unmatched_patterns_and_bad_bits() {
    let base: Scheme = "W4A8".parse().unwrap();
    let o = |pattern: &str| Override {
        pattern: pattern.into(),
        weight: Some(None),
        act: None,
    };
    base.clone()
        .with_override(o("layers.4.*"))
        .validate_for(&cfg(5))
        .unwrap();
    let e = base
        .clone()
        .with_override(o("layers.*.mlp.down_proj"))
        .with_override(o("layers.5.*"))
        .validate_for(&cfg(5))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "override #1: pattern \"layers.5.*\" matches no linear layer of the model (it has layers.0 ..= layers.4, \
         names like \"layers.0.self_attn.q_proj\", \"layers.0.mlp.down_proj\")"
    );
    let e = base
        .clone()
        .with_override(o("mlp.down_proj"))
        .validate_for(&cfg(5))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("pattern \"mlp.down_proj\" matches no linear layer"),
        "{e}"
    );
    let e = base.clone().with_override(o("")).validate().unwrap_err();
    assert!(e.to_string().contains("override #0: empty pattern"), "{e}");
    let bad = Override {
        pattern: "layers.1.*".into(),
        weight: None,
        act: Some(Some(ActQuant { bits: 1 })),
    };
    let e = base.with_override(bad).validate_for(&cfg(5)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "override #0 (\"layers.1.*\"): activation bits 1 out of range 2..=8"
    );
    let e = Scheme::new(None, None, Some(KvQuant::per_token(12)))
        .validate()
        .unwrap_err();
    assert_eq!(e.to_string(), "kv bits 12 out of range 2..=8");
}

#[test]
fn from_arg_accepts_names_inline_json_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let s = Scheme::new(
        Some(WeightQuant::sym_per_channel(3)),
        None,
        Some(KvQuant::per_token(8)),
    )
    .with_override(Override {
        pattern: "layers.0.*".into(),
        weight: Some(None),
        act: None,
    });
    s.save_to_dir(dir.path()).unwrap();
    let path = dir.path().join(SCHEME_FILE);
    assert_eq!(Scheme::load_from_dir(dir.path()).unwrap(), s);
    assert_eq!(Scheme::from_arg(path.to_str().unwrap()).unwrap(), s);
    assert_eq!(Scheme::from_arg("w4a8kv4").unwrap().to_string(), "W4A8KV4");
    assert_eq!(Scheme::from_arg(&s.to_string()).unwrap(), s);
    assert_eq!(
        Scheme::from_arg("W9").unwrap_err().to_string(),
        "invalid scheme \"W9\": weight bits 9 out of range 2..=8"
    );
    let missing = dir.path().join("nope.json");
    let e = Scheme::from_arg(missing.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.json: read: "), "{e}");
}

#[test]
fn fake_quant_hooks_follow_the_resolved_layer_settings() {
    // W4A8KV4 with layer 0 weights FP: layer 0 weight unchanged, layer 1 weight quantized,
    // activations quantized everywhere, KV quantized; flags per constructor.
    let s: Scheme = "W4A8KV4".parse().unwrap();
    let s = s.with_override(Override {
        pattern: "layers.0.*".into(),
        weight: Some(None),
        act: None,
    });
    let w = Tensor::new(
        &[[0.3f32, -0.7, 1.1, 0.05], [0.2, 0.9, -0.4, 0.6]],
        &Device::Cpu,
    )
    .unwrap();
    let train = FakeQuant::for_training(s.clone());
    let infer = FakeQuant::for_inference(s);
    assert!(!train.weight_is_static() && infer.weight_is_static());
    let vals = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(
        vals(infer.weight(id(0, LinearKind::Up), &w).unwrap()),
        vals(w.clone())
    );
    let q1 = vals(infer.weight(id(1, LinearKind::Up), &w).unwrap());
    assert_ne!(q1, vals(w.clone()));
    assert_eq!(
        q1,
        vals(qat_quant::fake_weight(&w, &WeightQuant::sym_per_channel(4)).unwrap())
    );
    assert_ne!(
        vals(infer.activation(id(0, LinearKind::Q), &w).unwrap()),
        vals(w.clone())
    );
    let kv = w.reshape((1, 2, 1, 4)).unwrap();
    assert_eq!(
        vals(infer.kv(0, KvKind::Value, &kv).unwrap()),
        vals(qat_quant::fake_kv(&kv, qat_quant::KvQuant::per_token(4)).unwrap())
    );
    // Training: a Var weight gets identity gradients through the hook.
    let var = Var::from_tensor(&w).unwrap();
    let out = train
        .weight(id(2, LinearKind::Down), var.as_tensor())
        .unwrap();
    assert_eq!(
        vals(out.clone()),
        vals(qat_quant::fake_weight(&w, &WeightQuant::sym_per_channel(4)).unwrap())
    );
    let grads = out.sum_all().unwrap().backward().unwrap();
    assert_eq!(
        vals(grads.get(var.as_tensor()).unwrap().clone()),
        vec![1.0; 8]
    );
}

#[test]
fn examples_in_the_spec_parse_and_validate() {
    // Every ```json block of formats/scheme.md is a valid scheme for a 5-layer model.
    let spec = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../formats/scheme.md"
    ))
    .unwrap();
    let blocks: Vec<&str> = spec
        .split("```json\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert_eq!(blocks.len(), 3);
    for block in &blocks {
        let s = Scheme::from_json_str(block, "formats/scheme.md".as_ref()).unwrap();
        s.validate_for(&cfg(5)).unwrap();
    }
    let name = |b: &str| Scheme::from_json_str(b, "".as_ref()).unwrap().to_string();
    assert_eq!(name(blocks[0]), "W4A8KV4");
    // The BitDistiller example: asym 3-bit groups of 64 (4 in the test model's down_proj).
    let s = Scheme::from_json_str(blocks[2], "".as_ref()).unwrap();
    assert_eq!(s.weight, Some(WeightQuant::asym_group(3, Some(64))));
    assert_eq!(
        s.resolve(id(2, LinearKind::Down)).weight,
        Some(WeightQuant::asym_group(3, None))
    );
}

fn with_weight(weight: &str) -> String {
    W4A8KV4_JSON.replace(
        r#"{ "bits": 4, "format": { "kind": "sym_per_channel" } }"#,
        weight,
    )
}

#[test]
fn group_formats_round_trip_through_json() {
    let parse = |w: &str| Scheme::from_json_str(&with_weight(w), "".as_ref());
    let cases = [
        (
            r#"{ "bits": 3, "format": { "kind": "asym_group", "group_size": 128 } }"#,
            WeightQuant::asym_group(3, Some(128)),
        ),
        (
            r#"{ "bits": 2, "format": { "kind": "asym_group", "group_size": null } }"#,
            WeightQuant::asym_group(2, None),
        ),
        (
            r#"{ "bits": 4, "format": { "kind": "asym_group", "group_size": 64 }, "grad": "ste" }"#,
            WeightQuant::asym_group(4, Some(64)).with_grad(WeightGrad::Ste),
        ),
        (
            r#"{ "bits": 4, "format": { "kind": "asym_group", "group_size": 64 }, "grad": "minmax" }"#,
            WeightQuant::asym_group(4, Some(64)),
        ),
        (
            r#"{ "bits": 3, "format": { "kind": "nf3", "group_size": 64 } }"#,
            WeightQuant::nf3(Some(64)),
        ),
        (
            r#"{ "bits": 4, "format": { "kind": "nf4", "group_size": null }, "grad": "ste" }"#,
            WeightQuant::nf4(None),
        ),
        (
            r#"{ "bits": 8, "format": { "kind": "sym_per_channel" }, "grad": "ste" }"#,
            WeightQuant::sym_per_channel(8),
        ),
    ];
    for (json, want) in cases {
        let s = parse(json).unwrap_or_else(|e| panic!("{json}: {e}"));
        assert_eq!(s.weight, Some(want), "{json}");
        let text = s.to_json_pretty();
        assert_eq!(
            Scheme::from_json_str(&text, "".as_ref()).unwrap(),
            s,
            "{text}"
        );
        // `grad` is written only when it differs from the format's default.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let grad = v["weight"].get("grad").and_then(|g| g.as_str());
        let default = want.format.default_grad();
        assert_eq!(
            grad,
            (want.grad != default).then_some(want.grad.name()),
            "{text}"
        );
        // Display (short name or compact JSON) parses back too.
        assert_eq!(s.to_string().parse::<Scheme>().unwrap(), s, "{}", s);
    }
    // group_size null is written explicitly.
    let v = serde_json::to_value(WeightQuant::asym_group(2, None)).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"bits": 2, "format": {"kind": "asym_group", "group_size": null}})
    );
    assert_eq!(WeightQuant::asym_group(2, None).grad, WeightGrad::MinMax);
    assert_eq!(
        WeightFormat::Nf3 {
            group_size: Some(8)
        }
        .to_string(),
        "nf3 (group_size 8)"
    );
}

#[test]
fn bad_group_formats_are_clear_errors() {
    let err = |w: &str| {
        Scheme::from_json_str(&with_weight(w), "q.json".as_ref())
            .unwrap_err()
            .to_string()
    };
    let cases = [
        (
            r#"{ "bits": 3, "format": { "kind": "asym_group" } }"#,
            "missing field `group_size`",
        ),
        (
            r#"{ "bits": 3, "format": { "kind": "asym_group", "groupsize": 64 } }"#,
            "unknown field `groupsize`",
        ),
        (
            r#"{ "bits": 3, "format": { "kind": "asym_group", "group_size": -1 } }"#,
            "invalid value: integer `-1`",
        ),
        (
            r#"{ "bits": 3, "format": { "kind": "asym_group", "group_size": 64 }, "grad": "lsq" }"#,
            "unknown variant `lsq`, expected `ste` or `minmax`",
        ),
        (
            r#"{ "bits": 3, "format": { "kind": "asym_group", "group_size": 64 }, "grads": "ste" }"#,
            "unknown field `grads`",
        ),
        (
            r#"{ "bits": 3, "format": { "kind": "asym_group", "group_size": 0 } }"#,
            "weight format asym_group: group_size 0 (expected >= 1, or null for one group per output channel)",
        ),
        (
            r#"{ "bits": 4, "format": { "kind": "nf3", "group_size": 64 } }"#,
            "weight format nf3 needs bits 3, found bits 4",
        ),
        (
            r#"{ "bits": 3, "format": { "kind": "nf4", "group_size": 64 } }"#,
            "weight format nf4 needs bits 4, found bits 3",
        ),
        (
            r#"{ "bits": 4, "format": { "kind": "nf4", "group_size": 64 }, "grad": "minmax" }"#,
            "weight grad \"minmax\" is not implemented for format nf4",
        ),
        (
            r#"{ "bits": 4, "format": { "kind": "sym_per_channel" }, "grad": "minmax" }"#,
            "weight grad \"minmax\" is not implemented for format sym_per_channel",
        ),
        (
            r#"{ "bits": 1, "format": { "kind": "asym_group", "group_size": 64 } }"#,
            "weight bits 1 out of range 2..=8",
        ),
    ];
    for (json, want) in cases {
        let e = err(json);
        assert!(e.contains(want), "{json}: {e}");
    }
    // In an override, the message names it.
    let o = Override {
        pattern: "layers.1.*".into(),
        weight: Some(Some(WeightQuant {
            bits: 3,
            ..WeightQuant::nf4(Some(4))
        })),
        act: None,
    };
    let e = Scheme::full_precision()
        .with_override(o)
        .validate()
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "override #0 (\"layers.1.*\"): weight format nf4 needs bits 4, found bits 3"
    );
}

#[test]
fn validate_for_names_a_layer_whose_in_features_the_group_does_not_divide() {
    // The test model: hidden 64, intermediate 172 = 4·43. Groups of 32 fit every layer but
    // down_proj (in 172); the first one checked is layers.0.mlp.down_proj.
    let s: Scheme = "W3G32A8".parse().unwrap();
    let e = s.validate_for(&cfg(5)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "layers.0.mlp.down_proj: weight format asym_group (group_size 32) does not fit the layer \
         ([64, 172]): group size 32 does not divide in_features 172"
    );
    // Per-channel down projections (an override) make it fit; so do groups of 4.
    let fixed = s.with_override(Override {
        pattern: "layers.*.mlp.down_proj".into(),
        weight: Some(Some(WeightQuant::asym_group(3, None))),
        act: None,
    });
    fixed.validate_for(&cfg(5)).unwrap();
    "NF3G4KV4"
        .parse::<Scheme>()
        .unwrap()
        .validate_for(&cfg(5))
        .unwrap();
    let e = "NF4G64"
        .parse::<Scheme>()
        .unwrap()
        .validate_for(&cfg(2))
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("layers.0.mlp.down_proj: weight format nf4 (group_size 64)"),
        "{e}"
    );
}
