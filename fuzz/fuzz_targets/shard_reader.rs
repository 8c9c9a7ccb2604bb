//! Fuzz target: arbitrary bytes as a shard file (formats/shards.md) → `ShardFileReader::open`,
//! then every record. Any outcome but a panic or abort is fine: a damaged file must be an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn path() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| std::env::temp_dir().join(format!("qat-fuzz-shard-{}.parquet", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(path(), data).expect("write the input file");
    if let Ok(reader) = qat_shards::ShardFileReader::open(path()) {
        if let Ok(records) = reader.records() {
            for r in records {
                if r.is_err() {
                    break;
                }
            }
        }
    }
});
