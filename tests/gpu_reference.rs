//! Checks of the GPU harness (bench/gpu) that need no GPU.
//!
//! The CPU perplexities `make pipeline-gpu` compares the GPU run with (bench/gpu/compare_ppl.py)
//! are README's: FP from the LLM-QAT section, RTN and QAT from the first row of each scheme in its
//! table, the rows of `make pipeline` as it is now. A new recipe that updates README but not the
//! script (as happened once: the script kept an older recipe's students) fails here.

use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The leading number of a table cell such as `**4.6600 (1.043x)** ✓`, or of a sentence's end.
fn leading_number(cell: &str) -> f64 {
    let cell = cell.trim().trim_start_matches('*');
    let end = cell
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(cell.len());
    cell[..end]
        .trim_end_matches('.')
        .parse()
        .unwrap_or_else(|_| panic!("README: no number at {:?}", &cell[..cell.len().min(80)]))
}

/// README's (RTN, QAT) perplexities of the first row of `scheme` in the LLM-QAT table.
fn readme_row(readme: &str, scheme: &str) -> (f64, f64) {
    let table = readme
        .split("| scheme | RTN ppl (x FP) | clip only | recipe | QAT ppl (x FP) |")
        .nth(1)
        .expect("README: the LLM-QAT table");
    let row = table
        .lines()
        .skip(1) // the rest of the header line
        .take_while(|l| l.starts_with('|'))
        .find(|l| l.split('|').nth(1).map(str::trim) == Some(scheme))
        .unwrap_or_else(|| panic!("README: no row for {scheme}"));
    let cells: Vec<&str> = row.split('|').collect();
    (leading_number(cells[2]), leading_number(cells[5]))
}

/// compare_ppl.py's `CPU = {"key": value, ...}` entries.
fn script_values(script: &str) -> Vec<(String, f64)> {
    let body = script
        .split("CPU = {")
        .nth(1)
        .and_then(|s| s.split('}').next())
        .expect("compare_ppl.py: the CPU dict");
    body.split(',')
        .map(|entry| {
            let (key, value) = entry.split_once(':').expect("key: value");
            (
                key.trim().trim_matches('"').to_string(),
                value.trim().parse().expect("a number"),
            )
        })
        .collect()
}

#[test]
fn gpu_comparison_uses_readmes_cpu_perplexities() {
    let readme = read("README.md");
    let values = script_values(&read("bench/gpu/compare_ppl.py"));
    assert_eq!(values.len(), 7, "{values:?}");
    for (key, value) in values {
        let want = match key.split_once('-') {
            None if key == "fp" => {
                let fp = readme
                    .split("the teacher's perplexity is ")
                    .nth(1)
                    .expect("README: the teacher's perplexity");
                leading_number(fp)
            }
            Some(("rtn", scheme)) => readme_row(&readme, scheme).0,
            Some(("qat", scheme)) => readme_row(&readme, scheme).1,
            _ => panic!("compare_ppl.py: unknown key {key}"),
        };
        assert_eq!(value, want, "compare_ppl.py {key} vs README");
    }
}

/// `make bench-gpu`'s kernel table (bench/gpu/ncu_kernels.py): its parser of Nsight Compute's CSV
/// log, the table's sums and shares, and the ncu command line, through the script's self-test
/// (a sample log and a stand-in ncu). Uses `python3` (or `QAT_PYTHON`), standard library only.
#[test]
fn ncu_kernel_table_self_test() {
    let python = std::env::var("QAT_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/gpu/ncu_kernels.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg("--self-test")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        out.status.success(),
        "{} --self-test failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
