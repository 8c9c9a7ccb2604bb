//! Hub ids for `--model`: a local directory wins; otherwise `owner/name[@revision]` resolves to a
//! snapshot directory of the Hugging Face cache, fetched with `hf-hub` only when it is not cached.
//!
//! The cache is the one the Python `huggingface_hub` and `hf-hub` share: `$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, laid out as
//! `models--owner--name/{refs/<revision>, snapshots/<commit>/<file>, blobs/<etag>}` where
//! `refs/<revision>` holds the 40-hex commit. A snapshot that already has a config, a tokenizer and
//! all of its weights is used without any network access; `HF_HUB_OFFLINE=1` forbids the network
//! altogether; `HF_ENDPOINT` replaces `https://huggingface.co`.

// `HubError` carries every detail a user needs to fix a failed resolution (id, file, endpoint,
// cache path, cause); it is returned at most once per model load, so its size does not matter.
#![allow(clippy::result_large_err)]

use serde::Serialize;
use std::path::{Path, PathBuf};

/// Files fetched when present; the weights are added by [`resolve_hub`].
const OPTIONAL_FILES: [&str; 4] = [
    "tokenizer_config.json",
    "generation_config.json",
    "quant_scheme.json",
    "provenance.json",
];
const INDEX: &str = "model.safetensors.index.json";

/// `owner/name` at a revision (a branch, tag or commit; `main` by default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HubId {
    pub repo_id: String,
    pub revision: String,
}

/// Where a model directory came from when it was resolved from the Hub cache (recorded in
/// provenance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HubSource {
    pub repo_id: String,
    /// The revision asked for (or, for a path into the cache, a ref pointing at the commit).
    pub revision: String,
    /// The resolved 40-hex commit (the snapshot's name).
    pub commit: String,
}

/// A `--model` argument resolved to a directory.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub dir: PathBuf,
    /// Set when `dir` is a snapshot of the Hub cache.
    pub hub: Option<HubSource>,
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "{arg} is not a local directory, and Hub model {id} is not in the cache {cache} while \
         HF_HUB_OFFLINE is set ({missing} missing): download it first (unset HF_HUB_OFFLINE on a \
         machine with network), point HF_HOME at a cache that has it, or pass a local model directory"
    )]
    NotCached {
        arg: String,
        id: String,
        cache: PathBuf,
        missing: String,
    },
    #[error(
        "{arg} is not a local directory, and {file} of Hub model {id} could not be fetched from \
         {endpoint}: the machine seems offline ({cause}); pre-download it into the cache {cache} \
         (e.g. `huggingface-cli download {repo_id} --revision {revision}` with HF_HOME set, on a machine with network), \
         point HF_HOME at a cache that has it, or pass a local model directory"
    )]
    Offline {
        arg: String,
        id: String,
        repo_id: String,
        revision: String,
        file: String,
        endpoint: String,
        cache: PathBuf,
        cause: String,
    },
    #[error("{arg} is not a local directory, and Hub model {id} has no {file} at {endpoint} (HTTP 404: no such repository, revision or file)")]
    NotFound {
        arg: String,
        id: String,
        file: String,
        endpoint: String,
    },
    #[error("Hub model {id}: fetching {file} from {endpoint} failed with HTTP {status} (a gated or private repository needs a token in $HF_HOME/token)")]
    Http {
        id: String,
        file: String,
        endpoint: String,
        status: u16,
    },
    #[error("Hub model {id}: fetching {file} failed: {cause}")]
    Fetch {
        id: String,
        file: String,
        cause: String,
    },
    #[error("Hub model {id}: {what}")]
    Invalid { id: String, what: String },
}

/// Parses `owner/name[@revision]` (Hub naming: ASCII letters, digits, `-`, `_`, `.`; no `--` or
/// `..`, not starting with `.` or `-`). Anything else is not a Hub id.
pub fn parse_hub_id(s: &str) -> Option<HubId> {
    let (repo, revision) = match s.split_once('@') {
        Some((r, rev))
            if !rev.is_empty() && !rev.contains(char::is_whitespace) && !rev.contains("..") =>
        {
            (r, rev)
        }
        Some(_) => return None,
        None => (s, "main"),
    };
    let (owner, name) = repo.split_once('/')?;
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['.', '-'])
            && !p.contains("--")
            && !p.contains("..")
    };
    (part_ok(owner) && part_ok(name)).then(|| HubId {
        repo_id: repo.to_string(),
        revision: revision.to_string(),
    })
}

/// Settings read from the environment.
#[derive(Debug, Clone)]
pub struct HubOptions {
    pub cache: PathBuf,
    pub endpoint: String,
    pub offline: bool,
}

impl HubOptions {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let cache = match (var("HF_HUB_CACHE"), var("HF_HOME"), var("HOME")) {
            (Some(c), _, _) => PathBuf::from(c),
            (None, Some(h), _) => PathBuf::from(h).join("hub"),
            (None, None, Some(home)) => PathBuf::from(home).join(".cache/huggingface/hub"),
            (None, None, None) => PathBuf::from(".cache/huggingface/hub"),
        };
        let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty());
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Self {
            cache,
            endpoint: endpoint
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            offline,
        }
    }
}

/// Resolves a `--model` argument: an existing local path as is; else a Hub id through the cache
/// (and the network when needed, see [`resolve_hub`]); anything else as is (opening it then
/// reports the missing directory).
pub fn resolve_model(arg: &Path) -> Result<ResolvedModel, HubError> {
    if arg.exists() {
        return Ok(ResolvedModel {
            dir: arg.to_path_buf(),
            hub: None,
        });
    }
    match arg.to_str().and_then(parse_hub_id) {
        Some(id) => resolve_hub(&arg.display().to_string(), &id, &HubOptions::from_env()),
        None => Ok(ResolvedModel {
            dir: arg.to_path_buf(),
            hub: None,
        }),
    }
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn repo_dir(cache: &Path, repo_id: &str) -> PathBuf {
    cache.join(format!("models--{}", repo_id.replace('/', "--")))
}

/// The cached snapshot of `id` (commit, directory), if its ref (or the commit itself) is there.
pub fn cached_snapshot(cache: &Path, id: &HubId) -> Option<(String, PathBuf)> {
    let repo = repo_dir(cache, &id.repo_id);
    let commit = match std::fs::read_to_string(repo.join("refs").join(&id.revision)) {
        Ok(text) => text.trim().to_string(),
        Err(_) if is_commit(&id.revision) => id.revision.clone(),
        Err(_) => return None,
    };
    let dir = repo.join("snapshots").join(&commit);
    dir.is_dir().then_some((commit, dir))
}

/// The first file a usable model directory lacks, or `None` when it is complete.
fn missing_file(dir: &Path) -> Option<String> {
    for f in ["config.json", "tokenizer.json"] {
        if !dir.join(f).is_file() {
            return Some(f.into());
        }
    }
    if dir.join("model.safetensors").is_file() || dir.join("model.packed.safetensors").is_file() {
        return None;
    }
    let Ok(text) = std::fs::read_to_string(dir.join(INDEX)) else {
        return Some("model.safetensors".into());
    };
    let Ok(shards) = index_shards(&text) else {
        return Some(INDEX.into());
    };
    shards.into_iter().find(|s| !dir.join(s).is_file())
}

/// The distinct shard file names of a safetensors index, sorted.
fn index_shards(text: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or("no \"weight_map\" object")?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    if files.iter().any(|f| f.contains("..") || f.starts_with('/')) {
        return Err("weight_map names a file outside the repository".into());
    }
    Ok(files)
}

/// Resolves `id` to a snapshot directory: the cache first (no network when it is complete),
/// then, unless `opts.offline`, `hf-hub` fetches config.json, tokenizer.json, the weights
/// (model.safetensors, or the index and its shards, or a packed model) and the optional files.
pub fn resolve_hub(arg: &str, id: &HubId, opts: &HubOptions) -> Result<ResolvedModel, HubError> {
    let shown = format!("{}@{}", id.repo_id, id.revision);
    let source = |commit: String| HubSource {
        repo_id: id.repo_id.clone(),
        revision: id.revision.clone(),
        commit,
    };
    let cached = cached_snapshot(&opts.cache, id);
    let missing = match &cached {
        Some((commit, dir)) => match missing_file(dir) {
            None => {
                return Ok(ResolvedModel {
                    dir: dir.clone(),
                    hub: Some(source(commit.clone())),
                })
            }
            Some(m) => m,
        },
        None => "config.json".into(),
    };
    if opts.offline {
        return Err(HubError::NotCached {
            arg: arg.into(),
            id: shown,
            cache: opts.cache.clone(),
            missing,
        });
    }
    let fetcher = Fetcher::new(arg, id, opts)?;
    let config = fetcher.get("config.json")?.expect("required");
    fetcher.get("tokenizer.json")?;
    if fetcher.optional("model.safetensors")?.is_none() {
        if let Some(index) = fetcher.optional(INDEX)? {
            let text = std::fs::read_to_string(&index).map_err(|e| HubError::Fetch {
                id: shown.clone(),
                file: INDEX.into(),
                cause: e.to_string(),
            })?;
            let shards = index_shards(&text).map_err(|what| HubError::Invalid {
                id: shown.clone(),
                what: format!("{INDEX}: {what}"),
            })?;
            for shard in shards {
                fetcher.get(&shard)?;
            }
        } else if fetcher.optional("model.packed.safetensors")?.is_none() {
            return Err(HubError::NotFound {
                arg: arg.into(),
                id: shown,
                file: "model.safetensors (or an index, or model.packed.safetensors)".into(),
                endpoint: opts.endpoint.clone(),
            });
        }
    }
    for f in OPTIONAL_FILES {
        fetcher.optional(f)?;
    }
    let dir = config
        .parent()
        .expect("a snapshot file has a parent")
        .to_path_buf();
    let commit = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(ResolvedModel {
        dir,
        hub: Some(source(commit)),
    })
}

/// One repository at one revision, through hf-hub's blocking client.
struct Fetcher<'a> {
    repo: hf_hub::api::sync::ApiRepo,
    arg: &'a str,
    id: &'a HubId,
    opts: &'a HubOptions,
}

impl<'a> Fetcher<'a> {
    fn new(arg: &'a str, id: &'a HubId, opts: &'a HubOptions) -> Result<Self, HubError> {
        let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(opts.cache.clone()))
            .with_endpoint(opts.endpoint.clone())
            .with_progress(true)
            .build()
            .map_err(|e| HubError::Fetch {
                id: id.repo_id.clone(),
                file: "(client)".into(),
                cause: e.to_string(),
            })?;
        let repo = api.repo(hf_hub::Repo::with_revision(
            id.repo_id.clone(),
            hf_hub::RepoType::Model,
            id.revision.clone(),
        ));
        Ok(Self {
            repo,
            arg,
            id,
            opts,
        })
    }

    /// The file's path in the snapshot; `Ok(None)` on HTTP 404.
    fn optional(&self, file: &str) -> Result<Option<PathBuf>, HubError> {
        use hf_hub::api::sync::ApiError;
        let shown = format!("{}@{}", self.id.repo_id, self.id.revision);
        match self.repo.get(file) {
            Ok(p) => Ok(Some(p)),
            Err(ApiError::RequestError(e)) => match *e {
                ureq::Error::Status(404, _) => Ok(None),
                ureq::Error::Status(status, _) => Err(HubError::Http {
                    id: shown,
                    file: file.into(),
                    endpoint: self.opts.endpoint.clone(),
                    status,
                }),
                ureq::Error::Transport(t) => Err(HubError::Offline {
                    arg: self.arg.into(),
                    id: shown,
                    repo_id: self.id.repo_id.clone(),
                    revision: self.id.revision.clone(),
                    file: file.into(),
                    endpoint: self.opts.endpoint.clone(),
                    cache: self.opts.cache.clone(),
                    cause: t.to_string(),
                }),
            },
            Err(e) => Err(HubError::Fetch {
                id: shown,
                file: file.into(),
                cause: e.to_string(),
            }),
        }
    }

    /// The file's path in the snapshot; a 404 is an error.
    fn get(&self, file: &str) -> Result<Option<PathBuf>, HubError> {
        match self.optional(file)? {
            Some(p) => Ok(Some(p)),
            None => Err(HubError::NotFound {
                arg: self.arg.into(),
                id: format!("{}@{}", self.id.repo_id, self.id.revision),
                file: file.into(),
                endpoint: self.opts.endpoint.clone(),
            }),
        }
    }
}

/// The Hub source of a directory that is a snapshot of a Hub cache
/// (`.../models--owner--name/snapshots/<commit>`), for provenance; `None` for any other path.
/// The revision is the first ref (sorted) that points at the commit, else the commit.
pub fn snapshot_source(dir: &Path) -> Option<HubSource> {
    let commit = dir.file_name()?.to_str()?.to_string();
    let snapshots = dir.parent()?;
    let repo = snapshots.parent()?;
    if !is_commit(&commit) || snapshots.file_name()? != "snapshots" {
        return None;
    }
    let repo_id = repo
        .file_name()?
        .to_str()?
        .strip_prefix("models--")?
        .replacen("--", "/", 1);
    let mut refs: Vec<String> = std::fs::read_dir(repo.join("refs"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    refs.sort();
    let revision = refs
        .into_iter()
        .find(|r| {
            std::fs::read_to_string(repo.join("refs").join(r)).is_ok_and(|t| t.trim() == commit)
        })
        .unwrap_or_else(|| commit.clone());
    Some(HubSource {
        repo_id,
        revision,
        commit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_parse_and_paths_do_not() {
        assert_eq!(
            parse_hub_id("karpathy/tinyllamas"),
            Some(HubId {
                repo_id: "karpathy/tinyllamas".into(),
                revision: "main".into()
            })
        );
        assert_eq!(parse_hub_id("a-b/c.d_e@v1.0").unwrap().revision, "v1.0");
        for not in [
            "stories260K",
            "out/students/w4/x",
            "./a/b",
            "../a",
            "/abs/path",
            "a/",
            "/b",
            "a/b@",
            "a/.b",
            "a--x/b",
            "a b/c",
        ] {
            assert_eq!(parse_hub_id(not), None, "{not}");
        }
    }

    #[test]
    fn cache_lookup_follows_refs_and_commits() {
        let t = std::env::temp_dir().join(format!("qat-hub-unit-{}", std::process::id()));
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snap = t.join("models--o--n/snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(t.join("models--o--n/refs")).unwrap();
        std::fs::write(t.join("models--o--n/refs/main"), format!("{commit}\n")).unwrap();
        let id = parse_hub_id("o/n").unwrap();
        assert_eq!(
            cached_snapshot(&t, &id),
            Some((commit.to_string(), snap.clone()))
        );
        let by_commit = parse_hub_id(&format!("o/n@{commit}")).unwrap();
        assert_eq!(
            cached_snapshot(&t, &by_commit).map(|c| c.1),
            Some(snap.clone())
        );
        assert_eq!(cached_snapshot(&t, &parse_hub_id("o/n@dev").unwrap()), None);
        assert_eq!(missing_file(&snap).as_deref(), Some("config.json"));
        let src = snapshot_source(&snap).unwrap();
        assert_eq!(
            (
                src.repo_id.as_str(),
                src.revision.as_str(),
                src.commit.as_str()
            ),
            ("o/n", "main", commit)
        );
        std::fs::remove_dir_all(&t).unwrap();
    }
}
