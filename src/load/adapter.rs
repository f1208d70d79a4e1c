//! An adapter file (or PEFT directory) read into normalised modules, optionally tied to a base.
//! The weights file is read into memory once (through `fsguard`): its hashes and its analysis
//! come from the same bytes (issue #14, finding 10).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde_json::Value;

use super::base::BaseModel;
use super::families;
use super::formats::{self, AdapterSource, Format, LoraConfig};
use super::fsguard::{self, Tree};
use super::hashes::{self, FileDigest, FileHashes};
use super::metadata::{self, Metadata};
use super::module::{Delta, LoraModule};
use super::names::KeyResolver;
use super::tensorfile::TensorFile;
use crate::error::{Error, Result};
use crate::order::natural_cmp;

/// Largest adapter file the single-file commands read into memory (16 GiB: LoRA and LyCORIS
/// files of SDXL, Flux and 70B language models are well under it; a full-weight difference of a
/// 12B model fits). A scan, which reads `--jobs` files at once, has its own lower limit
/// (`scan::MAX_SCAN_ADAPTER_BYTES`).
pub(crate) const MAX_ADAPTER_BYTES: u64 = 16 << 30;

/// Read a JSON file (through `fsguard`) and the digest of the bytes parsed.
pub(crate) fn read_json(p: &Path, tree: Option<&Tree>) -> Result<(Value, FileDigest)> {
    let bytes = fsguard::read(p, tree, fsguard::MAX_JSON_BYTES, "a JSON file")?;
    let v = serde_json::from_slice(&bytes).map_err(|e| Error::read(p, "invalid JSON", e))?;
    Ok((v, FileDigest::of(&bytes)))
}

/// An adapter's files found and its weights read into memory, not yet parsed.
pub(crate) struct AdapterRead {
    src: AdapterSource,
    /// The weights file's bytes (a scan keeps a handle to hash them when parsing fails).
    pub(crate) bytes: Arc<Vec<u8>>,
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Force a format instead of detecting it.
    pub format: Option<Format>,
    /// Downgrade "module matches nothing in the base" from an error to a warning.
    pub allow_unmatched: bool,
    /// Compute AutoV3 (SHA-256 of the tensor data) even when no `sshs_model_hash` is recorded.
    pub autov3: bool,
}

pub struct Adapter {
    /// The path the user gave (file or directory).
    pub path: PathBuf,
    pub file: Arc<TensorFile>,
    pub config_path: Option<PathBuf>,
    /// Digest of the config bytes that were parsed into `config_json`.
    pub(crate) config_digest: Option<FileDigest>,
    pub config_json: Option<Value>,
    pub config: Option<LoraConfig>,
    /// The naming scheme of the most modules (see `naming`).
    pub format: Format,
    /// Modules read under each naming scheme the keys follow, in precedence order (PEFT,
    /// diffusers, kohya/LyCORIS); a file of one scheme has one entry.
    pub(crate) naming: Vec<(Format, usize)>,
    /// Sorted by base key, then name.
    pub modules: Vec<LoraModule>,
    pub metadata: Metadata,
    /// Computed on first use, so callers can hash the file while other work runs.
    hashes: OnceLock<FileHashes>,
    want_autov3: bool,
    pub warnings: Vec<String>,
    /// Whether module names were checked against a base model.
    pub base_attached: bool,
}

impl Adapter {
    /// Open an adapter the user named: a file or a PEFT directory (see `formats::locate`), its
    /// weights read into memory (at most `MAX_ADAPTER_BYTES`).
    pub fn open(path: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::parse_read(path, Self::read(path, None, MAX_ADAPTER_BYTES)?, opts)
    }

    /// Find the adapter's files (`tree`: `None` when the user named `path`, else the tree a scan
    /// found it under) and read its weights file, at most `limit` bytes.
    pub(crate) fn read(path: &Path, tree: Option<&Tree>, limit: u64) -> Result<AdapterRead> {
        let src = formats::locate(path, tree)?;
        let w = &src.weights;
        super::tensorfile::refuse_pickle(w)?;
        let bytes = Arc::new(fsguard::read(w, src.weights_tree.as_ref(), limit, "an adapter read into memory")?);
        Ok(AdapterRead { src, bytes })
    }

    /// Parse what [`Adapter::read`] read; `path` is what the user or the scan named.
    pub(crate) fn parse_read(path: &Path, read: AdapterRead, opts: &LoadOptions) -> Result<Self> {
        let AdapterRead { src, bytes } = read;
        let file = Arc::new(TensorFile::from_shared(&src.weights, bytes)?);
        let (config_json, config_digest) = match &src.config {
            Some((p, tree)) => {
                let (v, d) = read_json(p, Some(tree))?;
                (Some(v), Some(d))
            }
            None => (None, None),
        };
        let config = src.config.as_ref().map(|(p, _)| p.clone()).zip(config_json);
        let mut a = Self::from_file(file, config, opts)?;
        a.path = path.to_path_buf();
        a.config_digest = config_digest;
        Ok(a)
    }

    /// An adapter from an opened tensor file (and its PEFT config, if any: the path it was read
    /// from, which errors about it name, and its JSON).
    pub(crate) fn from_file(
        file: Arc<TensorFile>,
        config: Option<(PathBuf, Value)>,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let parsed = formats::parse(&file, opts.format, config.as_ref().map(|(p, v)| (p.as_path(), v)))?;
        let mut metadata = metadata::parse(&file.metadata);
        // PEFT says what it was trained from in its config, not in the file.
        if let Some((_, cfg)) = &config {
            let field = |k: &str| cfg.get(k).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty());
            let t = &mut metadata.training;
            if t.base_model.is_none() {
                t.base_model = field("base_model_name_or_path").map(String::from);
            }
            t.task_type = field("task_type").map(String::from);
        }
        let mut warnings = parsed.warnings;
        warnings.extend(families::split_qkv_note(metadata.training.network_args.as_deref()));
        let mut modules = parsed.modules;
        modules.sort_by(|a, b| natural_cmp(&a.base_key, &b.base_key).then_with(|| natural_cmp(&a.name, &b.name)));
        let (config_path, config_json) = config.unzip();
        Ok(Adapter {
            path: file.path.clone(),
            file,
            config_path,
            config_digest: None,
            config_json,
            config: parsed.config,
            format: parsed.format,
            naming: parsed.naming,
            modules,
            metadata,
            hashes: OnceLock::new(),
            want_autov3: opts.autov3,
            warnings,
            base_attached: false,
        })
    }

    /// Whether the file's keys follow more than one naming scheme (scan flag `mixed-naming`).
    pub(crate) fn mixed_naming(&self) -> bool {
        self.naming.len() > 1
    }

    /// Map every module to its base weight and check shapes. Unmatched modules are an error
    /// listing them (or warnings with `allow_unmatched`).
    pub(crate) fn attach_base(&mut self, base: &BaseModel, allow_unmatched: bool) -> Result<()> {
        let resolver = KeyResolver::new(base.keys());
        let mut unmatched = vec![];
        let mut keep = vec![];
        let mut unmatched_names = vec![];
        for mut m in std::mem::take(&mut self.modules) {
            match resolve_module(&resolver, &m) {
                Ok(key) => {
                    let bshape = base.shape(&key).expect("resolved key exists").to_vec();
                    m.shape = reconcile_shape(&m, &bshape).map_err(|reason| {
                        // An XLabs single-block qkv_lora changes only some rows of its weight.
                        let why = families::xlabs_partial(&m.name).map(|p| format!(" ({p})")).unwrap_or_default();
                        Error::mismatch(
                            &self.file.path,
                            format!("module {} vs base weight {key}: {reason}{why}", m.name),
                        )
                    })?;
                    m.base_key = key;
                    m.resolved = true;
                    keep.push(m);
                }
                Err(why) => {
                    unmatched.push(why);
                    unmatched_names.push(m.name);
                }
            }
        }
        if !unmatched.is_empty() {
            let mut list = unmatched.iter().take(8).cloned().collect::<Vec<_>>().join("; ");
            if unmatched.len() > 8 {
                list += &format!("; and {} more", unmatched.len() - 8);
            }
            let names: Vec<&str> = unmatched_names.iter().map(String::as_str).collect();
            if let Some(why) = families::layout_mismatch(base.keys(), &names) {
                list = format!("{why}. Unmatched: {list}");
            }
            if !allow_unmatched {
                return Err(Error::mismatch(
                    &self.file.path,
                    format!("{} module(s) match nothing in base {}: {list}", unmatched.len(), base.path.display()),
                ));
            }
            self.warnings
                .push(format!("{} module(s) match nothing in the base and were skipped: {list}", unmatched.len()));
        }
        keep.sort_by(|a, b| natural_cmp(&a.base_key, &b.base_key).then_with(|| natural_cmp(&a.name, &b.name)));
        let mut dup = keep
            .windows(2)
            .filter(|w| w[0].base_key == w[1].base_key)
            .map(|w| w[0].base_key.clone())
            .collect::<Vec<_>>();
        dup.dedup();
        if !dup.is_empty() {
            return Err(Error::mismatch(
                &self.file.path,
                format!("several adapter modules change the same base weight: {}", dup.join(", ")),
            ));
        }
        self.modules = keep;
        self.base_attached = true;
        Ok(())
    }

    /// SHA-256, AutoV1/V2/V3 and the `sshs_model_hash` check of the adapter file.
    pub(crate) fn hashes(&self) -> &FileHashes {
        self.hashes.get_or_init(|| {
            let f = &self.file;
            let recorded = f.metadata.get("sshs_model_hash").map(String::as_str);
            let data = (recorded.is_some() || self.want_autov3).then(|| f.data_section());
            let mut h = hashes::file_hashes(f.bytes(), data, recorded);
            h.sshs_legacy_hash = f.metadata.get("sshs_legacy_hash").map(|rec| {
                let (header_len, parts) = match f.training_header() {
                    Some((header, order)) => {
                        let data = f.data_section();
                        (header.len(), order.iter().map(|e| &data[e.start..e.end]).collect())
                    }
                    None => (usize::MAX, vec![]),
                };
                hashes::check_legacy(rec, header_len, &parts)
            });
            h
        })
    }

    /// Stored adapter values (all module tensors).
    pub(crate) fn params(&self) -> usize {
        self.modules.iter().map(|m| m.params).sum()
    }

    /// A guess at the model family, from module names (and shapes where they tell).
    pub(crate) fn architecture(&self) -> String {
        families::guess_architecture(&self.modules)
    }
}

/// The base key a module denotes: its name looked up, else (for names that are no base path,
/// such as XLabs processors or kohya Flux names) the base weight read from the name without a
/// base, looked up in turn. The error is the name's.
fn resolve_module(resolver: &KeyResolver, m: &LoraModule) -> std::result::Result<String, String> {
    resolver.resolve(&m.name).or_else(|why| match m.base_key.strip_suffix(".weight").filter(|k| *k != m.name) {
        Some(guess) => resolver.resolve(guess).map_err(|_| why),
        None => Err(why),
    })
}

/// The base weight's shape if ΔW fits it (same rows, same number of values), else why not.
fn reconcile_shape(m: &LoraModule, base: &[usize]) -> std::result::Result<Vec<usize>, String> {
    let out = base.first().copied().unwrap_or(0);
    let cols: usize = base.iter().skip(1).product();
    match &m.delta {
        Delta::Ia3 { weight, on_input } => {
            let n = weight.numel();
            let axis = if *on_input { base.get(1).copied().unwrap_or(0) } else { out };
            if n != axis {
                return Err(format!(
                    "(IA)³ vector has {n} values, the base weight's {} axis has {axis}",
                    if *on_input { "input" } else { "output" }
                ));
            }
            Ok(base.to_vec())
        }
        Delta::Unsupported { .. } => Ok(base.to_vec()),
        _ => {
            let (mo, mc) = m.matrix_shape();
            if mo != out || mc != cols {
                return Err(format!("shape mismatch: ΔW is {:?}, base weight is {base:?}", m.shape));
            }
            if let Some(mag) = &m.magnitude {
                let n = mag.tensor.numel();
                let ok = match mag.axis {
                    super::module::NormAxis::Row => n == out,
                    super::module::NormAxis::Column => base.get(1).is_some_and(|&c| c == n),
                };
                if !ok {
                    return Err(format!(
                        "DoRA magnitude {} has {n} values, which fits neither axis of {base:?}",
                        mag.tensor.name
                    ));
                }
            }
            Ok(base.to_vec())
        }
    }
}
