//! Fuzz target: arbitrary bytes as `model.packed.safetensors` of a tiny model
//! (fuzz/tiny-config.json) → `qat_pack::load_packed`, which validates everything
//! (formats/packed.md section 6) and dequantizes. Errors are fine; a panic or abort is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

const CONFIG: &str = include_str!("../tiny-config.json");

fn dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("qat-fuzz-packed-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the model dir");
        std::fs::write(d.join("config.json"), CONFIG).expect("write config.json");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    std::fs::write(d.join(qat_pack::PACKED_FILE), data).expect("write the input file");
    let _ = qat_pack::load_packed(d, &candle_core::Device::Cpu);
});
