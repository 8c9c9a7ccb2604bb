//! CLI tests of Hub ids for `--model`, without network: a fake Hugging Face cache (the layout
//! hf-hub 0.4 and huggingface_hub share: models--owner--name/{refs/main, blobs/, snapshots/<commit>/}
//! with snapshot files symlinked to blobs) gives exactly the local directory's perplexity and
//! is recorded in provenance; an uncached id with no reachable endpoint fails with exit 2 and
//! says the machine seems offline.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};

const COMMIT: &str = "3f2a9c0d1e5b7a6f4c8d2e0b9a1c3d5e7f9a0b2c";
/// Nothing listens there: any fetch fails at once, and no test can reach the real Hub.
const DEAD_ENDPOINT: &str = "http://127.0.0.1:9";

/// Writes the stories260K files into `home/hub` as the cached snapshot `COMMIT` of
/// `qat-test/stories260K`, referenced by `refs/main`.
fn fake_cache(home: &Path) {
    let repo = home.join("hub/models--qat-test--stories260K");
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let bytes = std::fs::read(stories_dir().join(f)).unwrap();
        let blob = format!("{:x}{f}", bytes.len()).replace('.', "");
        std::fs::write(repo.join("blobs").join(&blob), &bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(f)).unwrap();
    }
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
}

/// Runs `bin` with a clean Hub environment: HF_HOME = `home`, the dead endpoint, and `extra`.
fn run_hub(bin: &str, home: &Path, extra: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("HF_HOME", home)
        .env("HF_ENDPOINT", DEAD_ENDPOINT)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().expect("spawn")
}

const EVAL: &str = env!("CARGO_BIN_EXE_qat-eval");

#[test]
fn a_cached_hub_id_evaluates_exactly_like_the_local_dir() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cache(tmp.path());
    let corpus = tinystories();
    let c = corpus.to_str().unwrap();
    let local = ok_json(&qat_eval(&[
        "--model",
        stories_dir().to_str().unwrap(),
        "--corpus",
        c,
        "--limit",
        "5",
        "-q",
    ]));
    assert!(local["model_hub"].is_null());
    for (id, offline) in [
        ("qat-test/stories260K", "1"),
        ("qat-test/stories260K@main", "0"),
        (&format!("qat-test/stories260K@{COMMIT}") as &str, "1"),
    ] {
        let out = run_hub(
            EVAL,
            tmp.path(),
            &[("HF_HUB_OFFLINE", offline)],
            &["--model", id, "--corpus", c, "--limit", "5", "-q"],
        );
        let hub = ok_json(&out);
        assert_eq!(hub["ppl"], local["ppl"], "{id}");
        assert_eq!(hub["nll"], local["nll"], "{id}");
        assert_eq!(hub["weights_sha256"], local["weights_sha256"], "{id}");
        assert_eq!(hub["model"], id);
        assert_eq!(hub["model_hub"]["repo_id"], "qat-test/stories260K");
        assert_eq!(hub["model_hub"]["commit"], COMMIT);
    }
}

#[test]
fn an_uncached_hub_id_without_network_fails_with_the_offline_message() {
    let tmp = tempfile::tempdir().unwrap();
    let c = tinystories();
    let c = c.to_str().unwrap();
    let out = run_hub(
        EVAL,
        tmp.path(),
        &[],
        &["--model", "qat-test/not-cached", "--corpus", c],
    );
    assert_error(&out, "qat-eval", "seems offline");
    let err = stderr(&out);
    for needle in [
        "qat-test/not-cached@main",
        "config.json",
        DEAD_ENDPOINT,
        "HF_HOME",
        "local model directory",
    ] {
        assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    }
    let out = run_hub(
        EVAL,
        tmp.path(),
        &[("HF_HUB_OFFLINE", "1")],
        &["--model", "qat-test/not-cached", "--corpus", c],
    );
    assert_error(&out, "qat-eval", "HF_HUB_OFFLINE is set");
    // A cached repository at a revision that is not cached is refused offline, too.
    fake_cache(tmp.path());
    let out = run_hub(
        EVAL,
        tmp.path(),
        &[("HF_HUB_OFFLINE", "1")],
        &["--model", "qat-test/stories260K@v2", "--corpus", c],
    );
    assert_error(
        &out,
        "qat-eval",
        "qat-test/stories260K@v2 is not in the cache",
    );
    // A path that is neither a directory nor a Hub id is reported as a missing directory.
    let out = run_hub(
        EVAL,
        tmp.path(),
        &[],
        &["--model", "no/such/dir", "--corpus", c],
    );
    assert_error(&out, "qat-eval", "no such directory");
}

#[test]
fn distill_records_the_hub_source_in_provenance() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cache(tmp.path());
    let shards = tmp.path().join("shards");
    small_shards(&shards);
    let out = tmp.path().join("student");
    let id = "qat-test/stories260K";
    let args = [
        "--model",
        id,
        "--teacher",
        id,
        "--shards",
        shards.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--scheme",
        "W4",
        "-b",
        "4",
        "--steps",
        "1",
        "-q",
    ];
    ok_json(&run_hub(
        env!("CARGO_BIN_EXE_qat-distill"),
        tmp.path(),
        &[("HF_HUB_OFFLINE", "1")],
        &args,
    ));
    let prov: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("provenance.json")).unwrap())
            .unwrap();
    for key in ["init_model_hub", "online_teacher_hub"] {
        assert_eq!(prov[key]["repo_id"], id, "{key}");
        assert_eq!(prov[key]["revision"], "main", "{key}");
        assert_eq!(prov[key]["commit"], COMMIT, "{key}");
    }
    assert_eq!(
        prov["init_weights_sha256"],
        "407a7c581bdd66972383ce9ad24857713fb98786d06ea564a2fe9b34ebe77dfd"
    );
}

/// A stand-in for the Hub's `resolve` endpoint on 127.0.0.1 serving the stories260K files as
/// `qat-test/served` at commit `commit` (the headers hf-hub 0.4 reads: etag, x-repo-commit,
/// Content-Range for `Range: bytes=N-`); any other path is a 404. Stops by itself after 64
/// connections or 120 s. Returns the endpoint URL.
fn serve_repo(commit: &'static str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let mut served = 0;
        while served < 64 && started.elapsed() < std::time::Duration::from_secs(120) {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            };
            served += 1;
            stream.set_nonblocking(false).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let (mut start, mut last) = (0usize, None::<usize>);
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap() == 0 || h.trim().is_empty() {
                    break;
                }
                if let Some(r) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = r.trim().split_once('-').unwrap();
                    start = a.parse().unwrap();
                    last = b.parse().ok();
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            let file = path
                .strip_prefix("/qat-test/served/resolve/main/")
                .unwrap_or("");
            let body = [
                "config.json",
                "tokenizer.json",
                "model.safetensors",
                "tokenizer_config.json",
            ]
            .contains(&file)
            .then(|| std::fs::read(stories_dir().join(file)).unwrap());
            let mut out = stream;
            match body {
                Some(bytes) => {
                    let end = last.unwrap_or(bytes.len() - 1).min(bytes.len() - 1);
                    let chunk = &bytes[start..=end];
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\netag: \"{}-{file}\"\r\nx-repo-commit: {commit}\r\nContent-Range: bytes {start}-{end}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        bytes.len(), bytes.len(), chunk.len()
                    );
                    let _ = out
                        .write_all(head.as_bytes())
                        .and_then(|_| out.write_all(chunk));
                }
                None => {
                    let _ = out.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            }
        }
    });
    url
}

#[test]
fn an_uncached_id_is_fetched_into_the_cache_then_used_offline() {
    const SERVED: &str = "8c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d";
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = serve_repo(SERVED);
    let c = tinystories();
    let c = c.to_str().unwrap();
    let args = [
        "--model",
        "qat-test/served",
        "--corpus",
        c,
        "--limit",
        "5",
        "-q",
    ];
    let fetched = ok_json(&run_hub(
        EVAL,
        tmp.path(),
        &[("HF_ENDPOINT", &endpoint)],
        &args,
    ));
    let local = ok_json(&qat_eval(&[
        "--model",
        stories_dir().to_str().unwrap(),
        "--corpus",
        c,
        "--limit",
        "5",
        "-q",
    ]));
    assert_eq!(fetched["ppl"], local["ppl"]);
    assert_eq!(fetched["model_hub"]["commit"], SERVED);
    // The standard layout: refs/main holds the commit, snapshot files link into blobs/.
    let repo = tmp.path().join("hub/models--qat-test--served");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main"))
            .unwrap()
            .trim(),
        SERVED
    );
    let cfg = repo.join("snapshots").join(SERVED).join("config.json");
    assert!(std::fs::symlink_metadata(&cfg)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read(&cfg).unwrap(),
        std::fs::read(stories_dir().join("config.json")).unwrap()
    );
    assert!(!repo
        .join("snapshots")
        .join(SERVED)
        .join("generation_config.json")
        .exists());
    // Now offline, with no endpoint at all: the cache alone serves it.
    let again = ok_json(&run_hub(
        EVAL,
        tmp.path(),
        &[("HF_HUB_OFFLINE", "1")],
        &args,
    ));
    assert_eq!(again["ppl"], local["ppl"]);
}
