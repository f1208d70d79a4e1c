//! Base model weights: a safetensors file, a Hugging Face directory (sharded or not), a
//! diffusers pipeline directory (weights of unet/, vae/, text_encoder[_2]/, transformer/ and the
//! configs and tokenizer files the image runtime reads), or a GGUF file (dequantised on demand,
//! names mapped to Hugging Face names, llama.cpp's q/k row permutation undone).
//!
//! Every file is opened through `fsguard` (a directory's files must stay inside it). Each file
//! is recorded with the digest of the bytes lorascope reads: JSON and tokenizer.json are read
//! into memory and parsed from those bytes; safetensors files are memory-mapped and hashed
//! before their header is parsed; a GGUF file is hashed through the descriptor its tensors are
//! later read from. After an analysis, `check_unchanged` hashes the mapped and GGUF bytes again
//! and refuses a file that changed (issue #14, finding 10).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use nalgebra::DMatrix;
use serde_json::Value;

use super::adapter::read_json;
use super::fsguard::{self, is_entry, Tree, MAX_JSON_BYTES};
use super::hashes::{sha256_stream, FileDigest};
use super::names::gguf_to_hf;
use super::tensorfile::{changed, dtype_name, refuse_pickle, TensorFile};
use crate::error::{Error, Result};

crate::named::closed_set! {
    /// How a base model is stored.
    pub enum BaseKind ("base kind") {
        Safetensors = "safetensors",
        HfDirectory = "hf-directory",
        DiffusersPipeline = "diffusers-pipeline",
        Gguf = "gguf",
    }
}

#[derive(Debug, Clone)]
enum Source {
    St {
        file: usize,
        name: String,
    },
    /// `heads`: undo llama.cpp's rotary permutation of q/k rows with this many heads.
    Gguf {
        name: String,
        heads: Option<usize>,
    },
}

#[derive(Debug, Clone)]
pub struct BaseEntry {
    pub shape: Vec<usize>,
    pub dtype: String,
    source: Source,
}

/// A weight matrix as its file stores it (see [`BaseModel::stored_matrix`]).
pub(crate) enum StoredMatrix {
    F32(Vec<f32>),
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
    /// f16 bit patterns.
    F16(Vec<u16>),
    Quant(QTensor),
}

/// A GGUF base: its parsed header, and the descriptor its tensors are read through (one reader
/// at a time: they share the file offset).
struct Gguf {
    path: PathBuf,
    content: gguf_file::Content,
    file: Mutex<File>,
    digest: FileDigest,
}

pub struct BaseModel {
    pub path: PathBuf,
    pub kind: BaseKind,
    /// Every file the weights were read from (for hashes).
    pub files: Vec<PathBuf>,
    /// The digest of each of `files` (same order), of the bytes lorascope read.
    pub(crate) digests: Vec<FileDigest>,
    pub entries: BTreeMap<String, BaseEntry>,
    st_files: Vec<Arc<TensorFile>>,
    gguf: Option<Gguf>,
    pub config: Option<Value>,
    /// tokenizer.json of a Hugging Face directory, read with the other files (the model runtime
    /// builds its tokenizer from these bytes, the recorded hash is theirs).
    tokenizer_json: Option<(PathBuf, Vec<u8>)>,
    /// The small files of a diffusers pipeline (model_index.json, component configs, scheduler
    /// config, tokenizer files), read at open like tokenizer.json and keyed by their path under
    /// the pipeline directory (`unet/config.json`).
    pipeline_files: BTreeMap<String, (PathBuf, Vec<u8>)>,
}

/// The small files of a diffusers pipeline that the image runtime reads (configs and the CLIP
/// tokenizer), read when present; weights are mapped separately.
const PIPELINE_FILES: &[&str] = &[
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "transformer/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
];

/// The files of a CLIP tokenizer folder (diffusers' `tokenizer/`): vocabulary and merges, or a
/// tokenizer.json, and the configs naming the special tokens and the maximum length.
pub(crate) const TOKENIZER_FILES: &[&str] =
    &["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

/// Small files read whole, by name: path, bytes and their digest.
pub(crate) type SmallFiles = BTreeMap<String, (PathBuf, Vec<u8>, FileDigest)>;

/// Read the files of `names` that exist under `dir` (through `fsguard`, at most
/// `MAX_JSON_BYTES` each, inside `tree`), each with the digest of the bytes read.
pub(crate) fn read_small_files(dir: &Path, tree: &Tree, names: &[&str]) -> Result<SmallFiles> {
    let mut out = BTreeMap::new();
    for name in names {
        let p = dir.join(name);
        if is_entry(&p) {
            let bytes = fsguard::read(&p, Some(tree), MAX_JSON_BYTES, "a configuration or tokenizer file")?;
            let d = FileDigest::of(&bytes);
            out.insert(name.to_string(), (p, bytes, d));
        }
    }
    Ok(out)
}

impl std::fmt::Debug for BaseModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseModel").field("path", &self.path).field("kind", &self.kind).finish()
    }
}

impl BaseModel {
    /// Open a base model the user named: a safetensors or GGUF file (it may be a link), or a
    /// directory whose files must stay inside it (a Hugging Face cache snapshot is one tree with
    /// its repository folder).
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::input(path, "base model: no such file or directory"));
        }
        if path.is_dir() {
            let tree = Tree::named(path, "the base model directory")?;
            if is_entry(&path.join("model_index.json")) {
                return Self::open_pipeline(path, &tree);
            }
            return Self::open_hf_dir(path, &tree);
        }
        refuse_pickle(path)?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("gguf") => Self::open_gguf(path),
            _ => {
                let mut b = Self::empty(path, BaseKind::Safetensors);
                b.add_st(path, None, "")?;
                Ok(b)
            }
        }
    }

    fn empty(path: &Path, kind: BaseKind) -> Self {
        BaseModel {
            path: path.to_path_buf(),
            kind,
            files: vec![],
            digests: vec![],
            entries: BTreeMap::new(),
            st_files: vec![],
            gguf: None,
            config: None,
            tokenizer_json: None,
            pipeline_files: BTreeMap::new(),
        }
    }

    fn record(&mut self, file: &Path, digest: FileDigest) {
        self.files.push(file.to_path_buf());
        self.digests.push(digest);
    }

    fn add_st(&mut self, file: &Path, tree: Option<&Tree>, prefix: &str) -> Result<()> {
        let tf = Arc::new(TensorFile::map(file, tree)?);
        let idx = self.st_files.len();
        for (name, e) in &tf.tensors {
            self.entries.insert(
                format!("{prefix}{name}"),
                BaseEntry {
                    shape: e.shape.clone(),
                    dtype: dtype_name(e.dtype),
                    source: Source::St { file: idx, name: name.clone() },
                },
            );
        }
        let digest = tf.mapped_digest().cloned().ok_or_else(|| Error::Internal("base file not mapped".into()))?;
        self.record(file, digest);
        self.st_files.push(tf);
        Ok(())
    }

    fn open_hf_dir(dir: &Path, tree: &Tree) -> Result<Self> {
        let mut b = Self::empty(dir, BaseKind::HfDirectory);
        let cfg = dir.join("config.json");
        if is_entry(&cfg) {
            let (v, d) = read_json(&cfg, Some(tree))?;
            b.config = Some(v);
            b.record(&cfg, d);
        }
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if is_entry(&index) {
            let (v, d) = read_json(&index, Some(tree))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::input(&index, "no weight_map object in the index"))?;
            let mut shards: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            shards.sort();
            shards.dedup();
            b.record(&index, d);
            for s in shards {
                if s.contains('/') || s.contains('\\') || s.contains("..") {
                    return Err(Error::input(&index, format!("shard name {s:?} leaves the model directory")));
                }
                let p = dir.join(s);
                if !is_entry(&p) {
                    return Err(Error::input(&index, format!("shard {s} named in the index is missing")));
                }
                b.add_st(&p, Some(tree), "")?;
            }
        } else if is_entry(&single) {
            b.add_st(&single, Some(tree), "")?;
        } else {
            for pickle in ["pytorch_model.bin", "model.ckpt"] {
                if is_entry(&dir.join(pickle)) {
                    refuse_pickle(&dir.join(pickle))?;
                }
            }
            return Err(Error::input(dir, "base directory has no model.safetensors or model.safetensors.index.json"));
        }
        let tok = dir.join("tokenizer.json");
        if is_entry(&tok) {
            let bytes = fsguard::read(&tok, Some(tree), MAX_JSON_BYTES, "a JSON file")?;
            b.record(&tok, FileDigest::of(&bytes));
            b.tokenizer_json = Some((tok, bytes));
        }
        Ok(b)
    }

    /// A diffusers pipeline: weights of each component under its folder, keys prefixed with
    /// the component name (`unet.`, `vae.`, `text_encoder.`, `text_encoder_2.`,
    /// `transformer.`), and the configs and tokenizer files the image runtime reads.
    fn open_pipeline(dir: &Path, tree: &Tree) -> Result<Self> {
        let mut b = Self::empty(dir, BaseKind::DiffusersPipeline);
        let index = dir.join("model_index.json");
        let bytes = fsguard::read(&index, Some(tree), MAX_JSON_BYTES, "a JSON file")?;
        b.record(&index, FileDigest::of(&bytes));
        b.pipeline_files.insert("model_index.json".into(), (index, bytes));
        for (name, (p, bytes, d)) in read_small_files(dir, tree, PIPELINE_FILES)? {
            b.record(&p, d);
            b.pipeline_files.insert(name, (p, bytes));
        }
        for comp in ["unet", "vae", "text_encoder", "text_encoder_2", "transformer"] {
            let d = dir.join(comp);
            for f in ["diffusion_pytorch_model.safetensors", "model.safetensors"] {
                if is_entry(&d.join(f)) {
                    b.add_st(&d.join(f), Some(tree), &format!("{comp}."))?;
                }
            }
        }
        if b.entries.is_empty() {
            return Err(Error::input(dir, "diffusers pipeline directory has no component .safetensors weights"));
        }
        Ok(b)
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let o = fsguard::open(path, None)?;
        // Hashed through the descriptor before the header is parsed from it.
        let digest = sha256_stream(&o.file, path)?;
        // The header's sizes are checked before candle's reader trusts them.
        (&o.file).seek(SeekFrom::Start(0)).map_err(|e| Error::read(path, "cannot seek", e))?;
        super::gguf_check::check_gguf_header(path, &o.file)?;
        (&o.file).seek(SeekFrom::Start(0)).map_err(|e| Error::read(path, "cannot seek", e))?;
        let mut r = BufReader::new(&o.file);
        let content = gguf_file::Content::read(&mut r).map_err(|e| Error::read(path, "invalid GGUF", e))?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_else(|| "llama".into());
        let meta_usize = |k: &str| {
            content
                .metadata
                .get(&format!("{arch}.{k}"))
                .and_then(|v| v.to_u32().ok().map(|x| x as usize).or_else(|| v.to_u64().ok().map(|x| x as usize)))
        };
        let heads = meta_usize("attention.head_count");
        let kv_heads = meta_usize("attention.head_count_kv").or(heads);
        let mut b = Self::empty(path, BaseKind::Gguf);
        let file_bits = digest.bytes.saturating_mul(8);
        for (name, info) in &content.tensor_infos {
            // candle's reader trusts the declared shape: a zero dimension makes it build a slice
            // from a dangling pointer, and no real tensor stores under one bit per value.
            let dims = info.shape.dims();
            let n = dims.iter().try_fold(1u64, |acc, &d| if d == 0 { None } else { acc.checked_mul(d as u64) });
            if n.is_none_or(|n| n > file_bits) {
                return Err(Error::input(
                    path,
                    format!("GGUF tensor {name} declares shape {dims:?}, which is empty or larger than the file"),
                ));
            }
            let hf = gguf_to_hf(name);
            let h = if name.ends_with("attn_q.weight") {
                heads
            } else if name.ends_with("attn_k.weight") {
                kv_heads
            } else {
                None
            };
            b.entries.insert(
                hf,
                BaseEntry {
                    shape: info.shape.dims().to_vec(),
                    dtype: format!("{:?}", info.ggml_dtype).to_ascii_lowercase(),
                    source: Source::Gguf { name: name.clone(), heads: h },
                },
            );
        }
        b.record(path, digest.clone());
        b.gguf = Some(Gguf { path: path.to_path_buf(), content, file: Mutex::new(o.file), digest });
        Ok(b)
    }

    /// Hash the memory-mapped and GGUF files again and refuse any that changed since they were
    /// opened (the numbers computed from them would not belong to the recorded hashes). Called
    /// at the end of every command that uses a base. A change undone before this check is not
    /// seen (docs/security.md).
    pub(crate) fn check_unchanged(&self) -> Result<()> {
        for f in &self.st_files {
            f.recheck()?;
        }
        if let Some(g) = &self.gguf {
            let file = g.file.lock().map_err(|_| Error::Internal("GGUF reader lock poisoned".into()))?;
            (&*file).seek(SeekFrom::Start(0)).map_err(|e| Error::read(&g.path, "cannot seek", e))?;
            let now = sha256_stream(&*file, &g.path)?;
            if now != g.digest {
                return Err(changed(&g.path, &g.digest.sha256, &now.sha256));
            }
        }
        Ok(())
    }

    /// tokenizer.json of a Hugging Face directory: its path and the bytes read at open.
    pub(crate) fn tokenizer_json(&self) -> Option<(&Path, &[u8])> {
        self.tokenizer_json.as_ref().map(|(p, b)| (p.as_path(), b.as_slice()))
    }

    /// A small file of a diffusers pipeline read at open (`unet/config.json`,
    /// `tokenizer/vocab.json`, …): its path and bytes.
    pub(crate) fn pipeline_file(&self, rel: &str) -> Option<(&Path, &[u8])> {
        self.pipeline_files.get(rel).map(|(p, b)| (p.as_path(), b.as_slice()))
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> + Clone {
        self.entries.keys().map(String::as_str)
    }

    pub(crate) fn shape(&self, key: &str) -> Option<&[usize]> {
        self.entries.get(key).map(|e| e.shape.as_slice())
    }

    /// Total number of parameters (all tensors).
    pub(crate) fn params(&self) -> usize {
        self.entries.values().map(|e| e.shape.iter().product::<usize>()).sum()
    }

    /// The parsed GGUF header (metadata and tensor index) when the base is a GGUF file.
    pub(crate) fn gguf(&self) -> Option<&gguf_file::Content> {
        self.gguf.as_ref().map(|g| &g.content)
    }

    fn entry(&self, key: &str) -> Result<&BaseEntry> {
        self.entries.get(key).ok_or_else(|| Error::input(&self.path, format!("base has no weight {key}")))
    }

    /// The weight as f64, flattened to `[shape[0], prod(shape[1..])]`.
    pub fn weight(&self, key: &str) -> Result<DMatrix<f64>> {
        let e = self.entry(key)?;
        let (rows, cols) = matrix_dims(&e.shape);
        let values: Vec<f64> = match &e.source {
            Source::St { file, name } => self.st_files[*file].read_f64(name)?,
            Source::Gguf { .. } => self.gguf_values(e)?.into_iter().map(f64::from).collect(),
        };
        Ok(DMatrix::from_row_slice(rows, cols, &values))
    }

    /// The weight's values as f32, row-major in its stored shape (for the model runtime, which
    /// computes in f32; f64 sources are rounded). A memory-mapped tensor's pages are dropped
    /// from the process afterwards (`TensorFile::release`), so a runtime holding its f32 copy
    /// does not also hold the mapped file.
    pub(crate) fn values_f32(&self, key: &str) -> Result<Vec<f32>> {
        let e = self.entry(key)?;
        match &e.source {
            Source::St { file, name } => {
                let f = &self.st_files[*file];
                let v = f.read_f64(name)?.into_iter().map(|v| v as f32).collect();
                f.release(name);
                Ok(v)
            }
            Source::Gguf { .. } => self.gguf_values(e),
        }
    }

    /// The matrix under `key` as stored, for a runtime that multiplies in the stored type:
    /// f32 (and f64, rounded) as f32 values, bf16/f16 as their 16-bit patterns, GGUF quantised
    /// blocks as candle's `QTensor` (q/k rows put back in Hugging Face order on the blocks
    /// themselves). A mapped tensor's pages are dropped from the process after the copy.
    pub(crate) fn stored_matrix(&self, key: &str) -> Result<StoredMatrix> {
        let e = self.entry(key)?;
        match &e.source {
            Source::St { file, name } => {
                let f = &self.st_files[*file];
                let entry = f.entry(name)?;
                let raw = f.raw(name)?;
                let halves = || raw.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
                let out = match entry.dtype {
                    safetensors::Dtype::BF16 => StoredMatrix::Bf16(halves()),
                    safetensors::Dtype::F16 => StoredMatrix::F16(halves()),
                    _ => StoredMatrix::F32(f.read_f64(name)?.into_iter().map(|v| v as f32).collect()),
                };
                f.release(name);
                Ok(out)
            }
            Source::Gguf { name, heads } => {
                let g = self.gguf.as_ref().expect("gguf source");
                let path = &g.path;
                let bad = |m: String| Error::input(path, format!("tensor {name}: {m}"));
                let q = {
                    let file = g.file.lock().map_err(|_| Error::Internal("GGUF reader lock poisoned".into()))?;
                    let mut r = BufReader::new(&*file);
                    g.content
                        .tensor(&mut r, name, &Device::Cpu)
                        .map_err(|e| Error::read(path, format!("tensor {name}"), e))?
                };
                let (rows, cols) = matrix_dims(&e.shape);
                let dtype = q.dtype();
                let order = match heads {
                    Some(h) => Some(unpermute_order(rows, *h).map_err(bad)?),
                    None => None,
                };
                let reorder = |v: Vec<u16>| match &order {
                    Some(o) => o.iter().flat_map(|&src| v[src * cols..(src + 1) * cols].to_vec()).collect(),
                    None => v,
                };
                let data = q.data().map_err(|e| Error::read(path, format!("tensor {name}"), e))?;
                let halves = || data.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect::<Vec<u16>>();
                Ok(match dtype {
                    GgmlDType::F16 => StoredMatrix::F16(reorder(halves())),
                    GgmlDType::BF16 => StoredMatrix::Bf16(reorder(halves())),
                    GgmlDType::F32 => {
                        drop(data);
                        StoredMatrix::F32(self.gguf_values(e)?)
                    }
                    _ => match &order {
                        None => {
                            drop(data);
                            StoredMatrix::Quant(q)
                        }
                        Some(o) => {
                            let rb = (cols.is_multiple_of(dtype.block_size()))
                                .then(|| cols / dtype.block_size() * dtype.type_size())
                                .ok_or_else(|| bad(format!("rows of {cols} values are not whole {dtype:?} blocks")))?;
                            let mut out = Vec::with_capacity(data.len());
                            for &src in o {
                                out.extend_from_slice(&data[src * rb..(src + 1) * rb]);
                            }
                            let t = qtensor_from_ggml(dtype, &out, vec![rows, cols], &Device::Cpu)
                                .map_err(|e| Error::read(path, format!("tensor {name}"), e))?;
                            StoredMatrix::Quant(t)
                        }
                    },
                })
            }
        }
    }

    /// Dequantise a GGUF tensor, undoing the q/k row permutation.
    fn gguf_values(&self, e: &BaseEntry) -> Result<Vec<f32>> {
        let Source::Gguf { name, heads } = &e.source else { unreachable!("gguf entry") };
        let g = self.gguf.as_ref().expect("gguf source");
        let (path, content) = (&g.path, &g.content);
        let q = {
            let file = g.file.lock().map_err(|_| Error::Internal("GGUF reader lock poisoned".into()))?;
            let mut r = BufReader::new(&*file);
            content.tensor(&mut r, name, &Device::Cpu).map_err(|e| Error::read(path, format!("tensor {name}"), e))?
        };
        let v = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| Error::read(path, format!("tensor {name}"), e))?;
        let (rows, cols) = matrix_dims(&e.shape);
        match heads {
            Some(h) => {
                unpermute_rows(&v, rows, cols, *h).map_err(|m| Error::input(path, format!("tensor {name}: {m}")))
            }
            None => Ok(v),
        }
    }
}

fn matrix_dims(shape: &[usize]) -> (usize, usize) {
    (shape.first().copied().unwrap_or(1), shape.iter().skip(1).product())
}

/// The source row of every Hugging Face row under llama.cpp's `permute(w, n_head)`: HF row
/// `h·d + s·d/2 + i` is GGUF row `h·d + 2i + s` (see [`unpermute_rows`]).
pub(crate) fn unpermute_order(rows: usize, heads: usize) -> std::result::Result<Vec<usize>, String> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(format!("{rows} rows cannot be split into {heads} heads of even size"));
    }
    let d = rows / heads;
    let half = d / 2;
    Ok((0..rows).map(|hf| (hf / d) * d + 2 * (hf % d % half) + (hf % d) / half).collect())
}

/// Undo llama.cpp's `permute(w, n_head)` (convert_hf_to_gguf.py), which interleaves the two
/// rotary halves of every head: GGUF row `h·d + 2i + s` holds HF row `h·d + s·d/2 + i`.
pub fn unpermute_rows<T: Copy + Default>(
    v: &[T],
    rows: usize,
    cols: usize,
    heads: usize,
) -> std::result::Result<Vec<T>, String> {
    let order = unpermute_order(rows, heads)?;
    let mut out = vec![T::default(); v.len()];
    for (hf, &gg) in order.iter().enumerate() {
        out[hf * cols..(hf + 1) * cols].copy_from_slice(&v[gg * cols..(gg + 1) * cols]);
    }
    Ok(out)
}
