//! Fuzz target: arbitrary text as a scheme, both as JSON (`Scheme::from_json_str`, what
//! quant_scheme.json and packed metadata go through) and as a short name (`str::parse`). A
//! scheme that parses must also survive what the tools do with it next: checking it against a
//! model, resolving every layer, and the JSON and short-name round trips must give it back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qat_quant::Scheme;
use std::path::Path;
use std::sync::OnceLock;

const CONFIG: &str = include_str!("../tiny-config.json");

fn config() -> &'static qat_model::LlamaConfig {
    static C: OnceLock<qat_model::LlamaConfig> = OnceLock::new();
    C.get_or_init(|| {
        let f: qat_model::LlamaConfigFile = serde_json::from_str(CONFIG).expect("tiny config");
        f.resolve(Path::new("tiny-config.json")).expect("valid tiny config")
    })
}

fn exercise(s: &Scheme) {
    let _ = s.validate_for(config());
    for layer in 0..config().num_layers {
        for kind in qat_model::LinearKind::ALL {
            let _ = s.resolve(qat_model::LinearId { layer, kind });
        }
    }
    let json = s.to_json_pretty();
    let back = Scheme::from_json_str(&json, Path::new("")).expect("a valid scheme's JSON parses");
    assert_eq!(&back, s, "JSON round trip changed the scheme: {json}");
    let shown = s.to_string();
    let again: Scheme = shown.parse().expect("Display output parses");
    assert_eq!(&again, s, "Display/FromStr round trip changed the scheme: {shown}");
    if let Some(name) = s.short_name() {
        let named: Scheme = name.parse().expect("short name parses");
        assert_eq!(&named, s, "short name {name} gives another scheme");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(s) = Scheme::from_json_str(text, Path::new("")) {
        exercise(&s);
    }
    if let Ok(s) = text.parse::<Scheme>() {
        exercise(&s);
    }
});
