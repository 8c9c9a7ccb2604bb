//! The fuzz targets of `fuzz/` (cargo-fuzz, nightly) on stable, as part of the normal suite
//! (issue 5): every input the fuzzers found crashing is replayed from
//! `tests/data/fuzz/<target>/`, and a seeded mutation loop (bit flips, byte overwrites,
//! truncation, insertion, deletion, splicing) runs over the committed seeds of
//! `fuzz/seeds/<target>/`. Each input goes through the same API as the fuzz target and must
//! give `Ok` or a typed error: a panic fails the test and names the input (written next to the
//! test's temp dir so it can be replayed), an abort kills the test binary.

mod common;

use common::{fast_tempdir, Rng};
use qat_quant::Scheme;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const TINY_CONFIG: &str = include_str!("../fuzz/tiny-config.json");

/// `shard_reader`: the bytes as a shard file, opened and read to the end.
fn shard_reader(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
    if let Ok(reader) = qat_shards::ShardFileReader::open(path) {
        if let Ok(records) = reader.records() {
            for r in records {
                if r.is_err() {
                    break;
                }
            }
        }
    }
}

/// `packed_reader`: the bytes as the packed file of a tiny model, loaded and validated.
fn packed_reader(dir: &Path, data: &[u8]) {
    std::fs::write(dir.join(qat_pack::PACKED_FILE), data).unwrap();
    let _ = qat_pack::load_packed(dir, &candle_core::Device::Cpu);
}

fn tiny_config() -> qat_model::LlamaConfig {
    let f: qat_model::LlamaConfigFile = serde_json::from_str(TINY_CONFIG).unwrap();
    f.resolve(Path::new("tiny-config.json")).unwrap()
}

/// `scheme`: the text as scheme JSON and as a short name; a scheme that parses is checked
/// against the tiny model, resolved for every layer, and must survive its JSON, `Display` and
/// short-name round trips.
fn scheme(cfg: &qat_model::LlamaConfig, data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let exercise = |s: Scheme| {
        let _ = s.validate_for(cfg);
        for layer in 0..cfg.num_layers {
            for kind in qat_model::LinearKind::ALL {
                let _ = s.resolve(qat_model::LinearId { layer, kind });
            }
        }
        let json = s.to_json_pretty();
        assert_eq!(
            Scheme::from_json_str(&json, Path::new("")).expect("a valid scheme's JSON parses"),
            s,
            "JSON round trip: {json}"
        );
        let shown = s.to_string();
        assert_eq!(
            shown.parse::<Scheme>().expect("Display output parses"),
            s,
            "Display round trip: {shown}"
        );
        if let Some(name) = s.short_name() {
            assert_eq!(
                name.parse::<Scheme>().expect("short name parses"),
                s,
                "short name {name}"
            );
        }
    };
    if let Ok(s) = Scheme::from_json_str(text, Path::new("")) {
        exercise(s);
    }
    if let Ok(s) = text.parse::<Scheme>() {
        exercise(s);
    }
}

fn files_in(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// One random mutation of `input` (`pool` supplies splices).
fn mutate(rng: &mut Rng, input: &[u8], pool: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(3) {
        let len = b.len() as u64;
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len) as usize;
                b[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len) as usize;
                b[i] = [0x00, 0xff, 0x7f, 0x80, b'0', b'9', b'"', b'-'][rng.below(8) as usize];
            }
            2 => b.truncate(rng.below(len + 1) as usize),
            3 => {
                let i = rng.below(len + 1) as usize;
                let n = 1 + rng.below(8) as usize;
                let fill: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
                b.splice(i..i, fill);
            }
            4 if len > 0 => {
                let i = rng.below(len) as usize;
                let n = (1 + rng.below(16) as usize).min(b.len() - i);
                b.drain(i..i + n);
            }
            5 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len() as u64) as usize].1;
                let (i, j) = (
                    rng.below(len + 1) as usize,
                    rng.below(other.len() as u64 + 1) as usize,
                );
                b.truncate(i);
                b.extend_from_slice(&other[j..]);
            }
            _ if len >= 8 => {
                // A little-endian length or offset field set to an extreme value.
                let i = rng.below(len - 7) as usize;
                let v: u64 = [0, 1, u32::MAX as u64, u64::MAX, 1 << 40][rng.below(5) as usize];
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
    b
}

/// Feeds `input` to `run`; on a panic, saves it and fails naming the file.
fn no_panic(target: &str, label: &str, input: &[u8], saved: &Path, run: &dyn Fn(&[u8])) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(input))).is_err() {
        let path = saved.join(format!("{target}-{label}"));
        std::fs::write(&path, input).unwrap();
        panic!("{target}: input {label} panicked; saved as {} (replay it from tests/data/fuzz/{target}/)", path.display());
    }
}

fn check_target(target: &str, iterations: u64, run: &dyn Fn(&[u8])) {
    let saved = std::env::temp_dir();
    let root = PathBuf::from(ROOT);
    let crashes = files_in(&root.join("tests/data/fuzz").join(target));
    for (name, bytes) in &crashes {
        no_panic(target, name, bytes, &saved, run);
    }
    let seeds = files_in(&root.join("fuzz/seeds").join(target));
    assert!(!seeds.is_empty(), "no seeds for {target}");
    let mut rng = Rng(0x1550_0005 ^ target.len() as u64);
    for (name, bytes) in &seeds {
        no_panic(target, name, bytes, &saved, run);
    }
    for i in 0..iterations {
        let (name, seed) = &seeds[rng.below(seeds.len() as u64) as usize];
        let input = mutate(&mut rng, seed, &seeds);
        no_panic(
            target,
            &format!("mutation-{i}-of-{name}"),
            &input,
            &saved,
            run,
        );
    }
    eprintln!(
        "{target}: {} saved crash inputs, {} seeds, {iterations} mutations: no panic",
        crashes.len(),
        seeds.len()
    );
}

#[test]
fn shard_reader_never_panics() {
    let tmp = fast_tempdir();
    let path = tmp.path().join("input.parquet");
    check_target("shard_reader", 2000, &|d| shard_reader(&path, d));
}

#[test]
fn packed_reader_never_panics() {
    let tmp = fast_tempdir();
    std::fs::write(tmp.path().join("config.json"), TINY_CONFIG).unwrap();
    check_target("packed_reader", 2000, &|d| packed_reader(tmp.path(), d));
}

#[test]
fn scheme_parser_never_panics_and_round_trips() {
    let cfg = tiny_config();
    check_target("scheme", 2000, &|d| scheme(&cfg, d));
}

/// Found by `fuzz/run.sh` (shard_reader): a column chunk with a negative offset in the footer
/// made the Parquet library panic while reading; the reader now refuses the footer up front.
#[test]
fn shard_with_a_negative_column_chunk_offset_is_a_clear_error() {
    let tmp = fast_tempdir();
    let path = tmp.path().join("shard-00000.parquet");
    std::fs::copy(
        Path::new(ROOT).join("tests/data/fuzz/shard_reader/negative-column-chunk-offset"),
        &path,
    )
    .unwrap();
    let e = qat_shards::ShardFileReader::open(&path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("shard-00000.parquet: damaged footer: row group 0, column "),
        "{e}"
    );
    assert!(e.contains("is not inside the file"), "{e}");
}

/// Found reviewing what packed_reader fuzzes and confirmed with its fuzz binary: a
/// `data_offsets` end near `u64::MAX` overflowed the size check (a panic with overflow checks,
/// a wrong expected size without).
#[test]
fn packed_data_offset_near_u64_max_is_a_clear_error() {
    let tmp = fast_tempdir();
    std::fs::write(tmp.path().join("config.json"), TINY_CONFIG).unwrap();
    std::fs::copy(
        Path::new(ROOT).join("tests/data/fuzz/packed_reader/data-offset-u64-max"),
        tmp.path().join(qat_pack::PACKED_FILE),
    )
    .unwrap();
    let Err(e) = qat_pack::load_packed(tmp.path(), &candle_core::Device::Cpu) else {
        panic!("a damaged file loaded")
    };
    let e = e.to_string();
    assert!(e.contains("model.packed.safetensors: not a valid safetensors file: data_offsets end 18446744073709551615 is larger than any file"), "{e}");
}
