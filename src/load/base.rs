//! Base model weights: a safetensors file, a Hugging Face directory (sharded or not), a
//! diffusers pipeline directory, or a GGUF file (dequantised on demand, names mapped to
//! Hugging Face names, llama.cpp's q/k row permutation undone).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::Device;
use nalgebra::DMatrix;
use serde_json::Value;

use super::names::gguf_to_hf;
use super::tensorfile::{dtype_name, refuse_pickle, TensorFile};
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

pub struct BaseModel {
    pub path: PathBuf,
    pub kind: BaseKind,
    /// Every file the weights were read from (for hashes).
    pub files: Vec<PathBuf>,
    pub entries: BTreeMap<String, BaseEntry>,
    st_files: Vec<Arc<TensorFile>>,
    gguf: Option<(PathBuf, gguf_file::Content)>,
    pub config: Option<Value>,
}

impl std::fmt::Debug for BaseModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseModel").field("path", &self.path).field("kind", &self.kind).finish()
    }
}

impl BaseModel {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::input(path, "base model: no such file or directory"));
        }
        if path.is_dir() {
            if path.join("model_index.json").is_file() {
                return Self::open_pipeline(path);
            }
            return Self::open_hf_dir(path);
        }
        refuse_pickle(path)?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("gguf") => Self::open_gguf(path),
            _ => {
                let mut b = Self::empty(path, BaseKind::Safetensors);
                b.add_st(path, "")?;
                Ok(b)
            }
        }
    }

    fn empty(path: &Path, kind: BaseKind) -> Self {
        BaseModel {
            path: path.to_path_buf(),
            kind,
            files: vec![],
            entries: BTreeMap::new(),
            st_files: vec![],
            gguf: None,
            config: None,
        }
    }

    fn add_st(&mut self, file: &Path, prefix: &str) -> Result<()> {
        let tf = Arc::new(TensorFile::open(file)?);
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
        self.files.push(file.to_path_buf());
        self.st_files.push(tf);
        Ok(())
    }

    fn open_hf_dir(dir: &Path) -> Result<Self> {
        let mut b = Self::empty(dir, BaseKind::HfDirectory);
        let cfg = dir.join("config.json");
        if cfg.is_file() {
            b.config = Some(read_json(&cfg)?);
            b.files.push(cfg);
        }
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        if index.is_file() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::input(&index, "no weight_map object in the index"))?;
            let mut shards: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            shards.sort();
            shards.dedup();
            b.files.push(index.clone());
            for s in shards {
                if s.contains('/') || s.contains('\\') || s.contains("..") {
                    return Err(Error::input(&index, format!("shard name {s:?} leaves the model directory")));
                }
                let p = dir.join(s);
                if !p.is_file() {
                    return Err(Error::input(&index, format!("shard {s} named in the index is missing")));
                }
                b.add_st(&p, "")?;
            }
        } else if single.is_file() {
            b.add_st(&single, "")?;
        } else {
            for pickle in ["pytorch_model.bin", "model.ckpt"] {
                if dir.join(pickle).is_file() {
                    refuse_pickle(&dir.join(pickle))?;
                }
            }
            return Err(Error::input(dir, "base directory has no model.safetensors or model.safetensors.index.json"));
        }
        let tok = dir.join("tokenizer.json");
        if tok.is_file() {
            b.files.push(tok);
        }
        Ok(b)
    }

    /// A diffusers pipeline: weights of each component under its folder, keys prefixed with
    /// the component name (`unet.`, `text_encoder.`, `text_encoder_2.`, `transformer.`).
    fn open_pipeline(dir: &Path) -> Result<Self> {
        let mut b = Self::empty(dir, BaseKind::DiffusersPipeline);
        b.files.push(dir.join("model_index.json"));
        for comp in ["unet", "text_encoder", "text_encoder_2", "transformer"] {
            let d = dir.join(comp);
            for f in ["diffusion_pytorch_model.safetensors", "model.safetensors"] {
                if d.join(f).is_file() {
                    b.add_st(&d.join(f), &format!("{comp}."))?;
                }
            }
        }
        if b.entries.is_empty() {
            return Err(Error::input(dir, "diffusers pipeline directory has no component .safetensors weights"));
        }
        Ok(b)
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        super::gguf_check::check_gguf_header(path)?;
        let f = File::open(path).map_err(|e| Error::read(path, "cannot open", e))?;
        let mut r = BufReader::new(f);
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
        let file_bits = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0).saturating_mul(8);
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
        b.files.push(path.to_path_buf());
        b.gguf = Some((path.to_path_buf(), content));
        Ok(b)
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
        self.gguf.as_ref().map(|(_, c)| c)
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
    /// computes in f32; f64 sources are rounded).
    pub(crate) fn values_f32(&self, key: &str) -> Result<Vec<f32>> {
        let e = self.entry(key)?;
        match &e.source {
            Source::St { file, name } => {
                Ok(self.st_files[*file].read_f64(name)?.into_iter().map(|v| v as f32).collect())
            }
            Source::Gguf { .. } => self.gguf_values(e),
        }
    }

    /// Dequantise a GGUF tensor, undoing the q/k row permutation.
    fn gguf_values(&self, e: &BaseEntry) -> Result<Vec<f32>> {
        let Source::Gguf { name, heads } = &e.source else { unreachable!("gguf entry") };
        let (path, content) = self.gguf.as_ref().expect("gguf source");
        let mut r = BufReader::new(File::open(path).map_err(|e| Error::read(path, "cannot open", e))?);
        let q =
            content.tensor(&mut r, name, &Device::Cpu).map_err(|e| Error::read(path, format!("tensor {name}"), e))?;
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

fn read_json(p: &Path) -> Result<Value> {
    let s = std::fs::read_to_string(p).map_err(|e| Error::read(p, "cannot read", e))?;
    serde_json::from_str(&s).map_err(|e| Error::read(p, "invalid JSON", e))
}

/// Undo llama.cpp's `permute(w, n_head)` (convert_hf_to_gguf.py), which interleaves the two
/// rotary halves of every head: GGUF row `h·d + 2i + s` holds HF row `h·d + s·d/2 + i`.
pub fn unpermute_rows<T: Copy + Default>(
    v: &[T],
    rows: usize,
    cols: usize,
    heads: usize,
) -> std::result::Result<Vec<T>, String> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(format!("{rows} rows cannot be split into {heads} heads of even size"));
    }
    let d = rows / heads;
    let half = d / 2;
    let mut out = vec![T::default(); v.len()];
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                let hf = h * d + s * half + i;
                let gg = h * d + 2 * i + s;
                out[hf * cols..(hf + 1) * cols].copy_from_slice(&v[gg * cols..(gg + 1) * cols]);
            }
        }
    }
    Ok(out)
}
