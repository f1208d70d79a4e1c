//! A safetensors file: header parsed and validated by the `safetensors` crate, tensors read on
//! demand and converted to f64. Adapters are read into memory (`from_shared`): their
//! hashes and their analysis share one copy of the bytes, and a file truncated under a scan
//! cannot raise SIGBUS. Base models are memory-mapped (`map`): copying gigabytes is not an
//! option, so the mapped bytes are hashed before the header is parsed and again after the
//! analysis (`recheck`), and a change in between is refused (issue #14, findings 6 and 10).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use super::fsguard::{self, Tree};
use super::hashes::FileDigest;
use crate::error::{Error, Result};

/// Header limit we accept (the crate allows 100 MB; real adapters have headers of a few MB).
pub(crate) const MAX_HEADER_BYTES: usize = 100_000_000;
/// Most tensors we accept in one file (real adapters have thousands).
pub(crate) const MAX_TENSORS: usize = 200_000;
/// Largest file we map (64 GiB: full fine-tunes of 30B models fit; adapters are far smaller).
pub(crate) const MAX_FILE_BYTES: u64 = 64 << 30;

#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub start: usize,
    pub end: usize,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The file's bytes: memory-mapped from disk, or read into memory (shared with a scan, which
/// hashes them when the file turns out not to be an adapter).
enum Storage {
    Map(Mmap),
    Owned(Arc<Vec<u8>>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Map(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

pub struct TensorFile {
    pub path: PathBuf,
    mmap: Storage,
    /// SHA-256 of the mapped bytes, taken before the header was parsed (mapped files only).
    mapped: Option<FileDigest>,
    header_len: usize,
    pub tensors: BTreeMap<String, TensorEntry>,
    pub metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for TensorFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorFile").field("path", &self.path).finish()
    }
}

/// Refuse pickle-based checkpoints before touching their bytes: unpickling runs arbitrary code.
pub(crate) fn refuse_pickle(path: &Path) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if matches!(ext.as_str(), "bin" | "pt" | "pth" | "ckpt" | "pkl" | "pickle") {
        return Err(Error::input(
            path,
            format!(
                "refusing a pickle-based .{ext} file: unpickling can execute code; convert it to \
                 safetensors first (e.g. `safetensors` convert script or `torch.load` + \
                 `safetensors.torch.save_file` in a sandbox)"
            ),
        ));
    }
    Ok(())
}

impl TensorFile {
    /// Memory-map a file the user named (see [`TensorFile::map`]).
    pub fn open(path: &Path) -> Result<Self> {
        Self::map(path, None)
    }

    /// Memory-map `path` (opened through `fsguard`: a regular file, inside `tree` when given),
    /// hash the mapped bytes, then parse the header from them.
    pub(crate) fn map(path: &Path, tree: Option<&Tree>) -> Result<Self> {
        refuse_pickle(path)?;
        let o = fsguard::open(path, tree)?;
        // Checked before mapping: an empty file cannot be mapped.
        check_length(path, o.len)?;
        if o.len > MAX_FILE_BYTES {
            return Err(Error::input(path, format!("{} bytes, more than the {MAX_FILE_BYTES}-byte limit", o.len)));
        }
        // SAFETY: the map is read-only. A file changed underneath gives bytes that differ from
        // those hashed here, which `recheck` refuses; a file truncated underneath raises SIGBUS
        // (base models only: adapters are read into memory).
        let mmap = unsafe { memmap2::MmapOptions::new().map(&o.file) }
            .map_err(|e| Error::read(path, "cannot memory-map", e))?;
        let digest = digest_releasing(&mmap);
        let mut tf = Self::parse(path, Storage::Map(mmap))?;
        tf.mapped = Some(digest);
        Ok(tf)
    }

    /// Parse a safetensors file held in memory (fuzzing, tests); `path` names it in errors.
    #[cfg_attr(not(feature = "fuzzing"), allow(dead_code))]
    pub(crate) fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::from_shared(path, Arc::new(bytes))
    }

    /// Parse bytes already read (the caller may keep a handle on them).
    pub(crate) fn from_shared(path: &Path, bytes: Arc<Vec<u8>>) -> Result<Self> {
        check_length(path, bytes.len() as u64)?;
        Self::parse(path, Storage::Owned(bytes))
    }

    /// The SHA-256 of a memory-mapped file's bytes as they were when it was opened (`None` for
    /// bytes in memory, which cannot change).
    pub(crate) fn mapped_digest(&self) -> Option<&FileDigest> {
        self.mapped.as_ref()
    }

    /// For a memory-mapped file: hash the mapped bytes again and refuse if they differ from the
    /// hash taken when it was opened (the file was changed while lorascope read it). A change
    /// that is undone before this check is not seen (docs/security.md).
    pub(crate) fn recheck(&self) -> Result<()> {
        // Only mapped files have a digest taken at open.
        let (Some(before), Storage::Map(m)) = (&self.mapped, &self.mmap) else { return Ok(()) };
        let now = digest_releasing(m);
        if now != *before {
            return Err(changed(&self.path, &before.sha256, &now.sha256));
        }
        Ok(())
    }

    fn parse(path: &Path, data: Storage) -> Result<Self> {
        let size = data.len() as u64;
        if size > MAX_FILE_BYTES {
            return Err(Error::input(path, format!("{size} bytes, more than the {MAX_FILE_BYTES}-byte limit")));
        }
        let n = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        if data[..8] == [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46] || data.starts_with(b"PK\x03\x04") {
            return Err(Error::input(
                path,
                "this is a PyTorch pickle/zip checkpoint, not safetensors; refusing to unpickle it",
            ));
        }
        if let Some(why) = lfs_pointer(&data) {
            return Err(Error::input(path, why));
        }
        if n > MAX_HEADER_BYTES as u64 {
            if n > size {
                return Err(Error::input(
                    path,
                    format!("header length {n} exceeds the file size ({size} bytes): truncated or not safetensors"),
                ));
            }
            return Err(Error::input(
                path,
                format!("header of {n} bytes is larger than the {MAX_HEADER_BYTES}-byte limit"),
            ));
        }
        if n + 8 > size {
            return Err(Error::input(
                path,
                format!("header length {n} exceeds the file size ({size} bytes): truncated or not safetensors"),
            ));
        }
        let (header_len, meta) = SafeTensors::read_metadata(&data).map_err(|e| header_error(path, e, size, n))?;
        if meta.tensors().len() > MAX_TENSORS {
            return Err(Error::input(
                path,
                format!("{} tensors, more than the {MAX_TENSORS} lorascope accepts", meta.tensors().len()),
            ));
        }
        let mut tensors = BTreeMap::new();
        for (name, info) in meta.tensors() {
            tensors.insert(
                name,
                TensorEntry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: info.data_offsets.0,
                    end: info.data_offsets.1,
                },
            );
        }
        let metadata = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Ok(TensorFile { path: path.to_path_buf(), mmap: data, mapped: None, header_len, tensors, metadata })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// The tensor data section: everything after the 8-byte length and the JSON header.
    pub(crate) fn data_section(&self) -> &[u8] {
        &self.mmap[8 + self.header_len..]
    }

    /// The header sd-scripts' `precalculate_safetensors_hashes` builds when it re-serialises the
    /// tensors with only the `ss_` metadata: the safetensors crate's own `Metadata`, tensors in
    /// its order (descending dtype, then name), serialised by serde_json. `None` when the crate
    /// refuses the layout.
    pub(crate) fn training_header(&self) -> Option<(Vec<u8>, Vec<&TensorEntry>)> {
        let mut order: Vec<(&String, &TensorEntry)> = self.tensors.iter().collect();
        order.sort_by(|(ln, l), (rn, r)| r.dtype.cmp(&l.dtype).then(ln.cmp(rn)));
        let mut offset = 0;
        let mut infos = Vec::with_capacity(order.len());
        for (name, e) in &order {
            let n = e.end - e.start;
            infos.push((
                name.to_string(),
                safetensors::tensor::TensorInfo {
                    dtype: e.dtype,
                    shape: e.shape.clone(),
                    data_offsets: (offset, offset + n),
                },
            ));
            offset += n;
        }
        let ss: std::collections::HashMap<String, String> =
            self.metadata.iter().filter(|(k, _)| k.starts_with("ss_")).map(|(k, v)| (k.clone(), v.clone())).collect();
        let meta = safetensors::tensor::Metadata::new(Some(ss), infos).ok()?;
        let header = serde_json::to_vec(&meta).ok()?;
        Some((header, order.into_iter().map(|(_, e)| e).collect()))
    }

    pub(crate) fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors.get(name).ok_or_else(|| Error::input(&self.path, format!("tensor {name} not found")))
    }

    pub(crate) fn raw(&self, name: &str) -> Result<&[u8]> {
        let e = self.entry(name)?;
        Ok(&self.data_section()[e.start..e.end])
    }

    /// Drop a mapped tensor's pages from this process once its values were copied out (a base
    /// model read into the runtime's own f32 tensors): they stay in the page cache, and a later
    /// read faults them back in with the same bytes. So the process holds the runtime's copy,
    /// not that copy plus the mapped file. Nothing for bytes in memory.
    pub(crate) fn release(&self, name: &str) {
        if let (Storage::Map(m), Ok(e)) = (&self.mmap, self.entry(name)) {
            release_range(m, 8 + self.header_len + e.start, e.end - e.start);
        }
    }

    /// The tensor's values as f64, row-major, from any float dtype.
    pub(crate) fn read_f64(&self, name: &str) -> Result<Vec<f64>> {
        let e = self.entry(name)?;
        decode_f64(self.raw(name)?, e.dtype)
            .ok_or_else(|| Error::input(&self.path, format!("tensor {name} has dtype {:?}, not a float type", e.dtype)))
    }
}

/// Bytes of a mapped file hashed before its pages are dropped (see [`digest_releasing`]).
const HASH_PIECE: usize = 64 << 20;

/// SHA-256 of a mapped file, dropping each 64 MiB piece's pages from this process once hashed:
/// hashing a 4 GB base (at open, and again in `recheck` beside the model built from it) then
/// holds 64 MiB of the file, not all of it.
fn digest_releasing(m: &Mmap) -> FileDigest {
    FileDigest::of_pieces(m, HASH_PIECE, |at, len| release_range(m, at, len))
}

/// madvise(MADV_DONTNEED) on part of a read-only file map: the pages leave this process's
/// resident set; the next access reads them again from the page cache (or the file). The map
/// is read-only and never written, so no data is lost; a file changed on disk meanwhile shows
/// its new bytes, which `recheck`'s second hash refuses as it always has. A failure only
/// means the pages stay resident.
fn release_range(m: &Mmap, at: usize, len: usize) {
    // memmap2 checks the offset and the length apart, not their sum.
    if at.checked_add(len).is_none_or(|end| end > m.len()) {
        return;
    }
    #[cfg(unix)]
    // SAFETY: see above; no reference into the range is held across the call by this crate
    // that depends on the old pages (they read back identical while the file is unchanged).
    unsafe {
        let _ = m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at, len);
    }
    #[cfg(not(unix))]
    let _ = (m, at, len);
}

/// A file whose bytes changed between the hash taken when it was opened and the one after.
pub(crate) fn changed(path: &Path, before: &str, after: &str) -> Error {
    Error::input(
        path,
        format!(
            "changed while lorascope read it (SHA-256 {before} when opened, {after} after the analysis); \
             the results were discarded: run again on a file that is not being written"
        ),
    )
}

/// A Git LFS pointer saved in place of the file (a clone without `git lfs pull`, or a hub
/// page saved by hand): what it points to, from its `oid sha256:` and `size` lines
/// (git-lfs spec v1). Read as safetensors it would claim a header of 2.3·10¹⁸ bytes.
fn lfs_pointer(data: &[u8]) -> Option<String> {
    if !data.starts_with(b"version https://git-lfs.github.com/spec/") || data.len() > 1024 {
        return None;
    }
    let text = String::from_utf8_lossy(data);
    let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(|v| crate::shown::inline(v.trim()));
    let oid = field("oid sha256:").unwrap_or_else(|| "?".into());
    let size = field("size ").unwrap_or_else(|| "?".into());
    Some(format!(
        "this is a Git LFS pointer, not the file: the real file (sha256 {oid}, {size} bytes) was never downloaded; \
         fetch it with `git lfs pull` or download the file itself"
    ))
}

/// A safetensors file holds at least its 8-byte header length.
fn check_length(path: &Path, size: u64) -> Result<()> {
    match size {
        0 => Err(Error::input(path, "empty file (0 bytes), not a safetensors file")),
        1..8 => Err(Error::input(
            path,
            format!("truncated: {size} bytes, shorter than the 8-byte safetensors header length"),
        )),
        _ => Ok(()),
    }
}

/// Running sums over the finite values of one or more tensors, for the per-module value
/// statistics users compare adapters by (L1, largest magnitude, spread).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct ValueSums {
    pub count: usize,
    pub sum: f64,
    pub sum_sq: f64,
    pub sum_abs: f64,
    pub max_abs: f64,
}

impl ValueSums {
    /// The sums over a tensor's finite values, decoded in blocks (no copy of the whole tensor);
    /// `None` for a non-float dtype.
    pub(crate) fn of(bytes: &[u8], dtype: Dtype) -> Option<ValueSums> {
        if !matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64) {
            return None;
        }
        const BLOCK: usize = 1 << 16;
        let width = dtype.bitsize() / 8;
        let (mut out, mut scratch) = (vec![0.0; BLOCK], Vec::new());
        let mut s = ValueSums::default();
        for chunk in bytes.chunks(BLOCK * width) {
            let out = &mut out[..chunk.len() / width];
            decode_values(chunk, dtype, out, &mut scratch);
            for &x in out.iter().filter(|x| x.is_finite()) {
                s.count += 1;
                s.sum += x;
                s.sum_sq += x * x;
                s.sum_abs += x.abs();
                s.max_abs = s.max_abs.max(x.abs());
            }
        }
        Some(s)
    }

    pub(crate) fn add(self, o: ValueSums) -> ValueSums {
        ValueSums {
            count: self.count + o.count,
            sum: self.sum + o.sum,
            sum_sq: self.sum_sq + o.sum_sq,
            sum_abs: self.sum_abs + o.sum_abs,
            max_abs: self.max_abs.max(o.max_abs),
        }
    }

    /// Population standard deviation (0 for no values).
    pub(crate) fn std(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let n = self.count as f64;
        let mean = self.sum / n;
        (self.sum_sq / n - mean * mean).max(0.0).sqrt()
    }
}

/// Little-endian bytes of a float dtype to f64. `None` for non-float dtypes.
pub(crate) fn decode_f64(bytes: &[u8], dtype: Dtype) -> Option<Vec<f64>> {
    // Refuse before allocating: a hostile file may hold a huge integer tensor.
    if !matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64) {
        return None;
    }
    let mut out = vec![0.0; bytes.len() / (dtype.bitsize() / 8)];
    decode_values(bytes, dtype, &mut out, &mut Vec::new());
    Some(out)
}

/// Decode little-endian floats into `out` (as many as fit), using `scratch` for aligned half
/// bits. Returns false for a non-float dtype or a non-finite value.
pub(crate) fn decode_into(bytes: &[u8], dtype: Dtype, out: &mut [f64], scratch: &mut Vec<u16>) -> bool {
    decode_values(bytes, dtype, out, scratch) && out.iter().all(|x| x.is_finite())
}

/// The one float decoder: fills `out`, false for a non-float dtype. Half types go through
/// `half`'s slice conversion (F16C when the CPU has it) from an aligned copy of the bits in
/// `scratch`: safetensors does not promise 2-byte alignment.
fn decode_values(bytes: &[u8], dtype: Dtype, out: &mut [f64], scratch: &mut Vec<u16>) -> bool {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    let n = out.len();
    match dtype {
        Dtype::F16 | Dtype::BF16 => {
            scratch.clear();
            scratch.extend(bytes[..2 * n].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
            if dtype == Dtype::F16 {
                scratch.reinterpret_cast::<half::f16>().convert_to_f64_slice(out);
            } else {
                scratch.reinterpret_cast::<half::bf16>().convert_to_f64_slice(out);
            }
        }
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes(c.try_into().unwrap()) as f64;
            }
        }
        Dtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().unwrap());
            }
        }
        _ => return false,
    }
    true
}

/// What one pass over a tensor's bits tells: NaN/±Inf count, whether every value is ±0, and
/// how many finite values lie beyond ±`limit`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FloatStats {
    pub nonfinite: usize,
    pub zero: bool,
    pub beyond: usize,
}

/// [`FloatStats`] read straight from the bits (no conversion): a float's magnitude orders as
/// its bits without the sign, so |x| > `limit` is a comparison with the largest value of the
/// dtype not above `limit`. `None` for non-float dtypes.
pub(crate) fn float_stats(bytes: &[u8], dtype: Dtype, limit: f64) -> Option<FloatStats> {
    fn scan<const N: usize>(bytes: &[u8], exp: u64, mag: u64, top: u64) -> FloatStats {
        let mut s = FloatStats { nonfinite: 0, zero: true, beyond: 0 };
        for c in bytes.chunks_exact(N) {
            let mut buf = [0u8; 8];
            buf[..N].copy_from_slice(c);
            let v = u64::from_le_bytes(buf);
            let nonfinite = v & exp == exp;
            s.nonfinite += usize::from(nonfinite);
            s.beyond += usize::from(!nonfinite && v & mag > top);
            s.zero &= v & mag == 0;
        }
        s
    }
    /// The bits of the largest value of a dtype not above `limit` (≥ 0), from its rounded
    /// conversion `bits` and the conversion back.
    fn top(limit: f64, bits: u64, back: impl Fn(u64) -> f64) -> u64 {
        if back(bits) > limit {
            bits - 1
        } else {
            bits
        }
    }
    let limit = limit.abs();
    Some(match dtype {
        Dtype::F16 => {
            let t =
                top(limit, half::f16::from_f64(limit).to_bits() as u64, |b| half::f16::from_bits(b as u16).to_f64());
            scan::<2>(bytes, 0x7c00, 0x7fff, t)
        }
        Dtype::BF16 => {
            let t =
                top(limit, half::bf16::from_f64(limit).to_bits() as u64, |b| half::bf16::from_bits(b as u16).to_f64());
            scan::<2>(bytes, 0x7f80, 0x7fff, t)
        }
        Dtype::F32 => {
            let t = top(limit, (limit as f32).to_bits() as u64, |b| f32::from_bits(b as u32) as f64);
            scan::<4>(bytes, 0x7f80_0000, 0x7fff_ffff, t)
        }
        Dtype::F64 => scan::<8>(bytes, 0x7ff0_0000_0000_0000, 0x7fff_ffff_ffff_ffff, limit.to_bits()),
        _ => return None,
    })
}

pub(crate) fn dtype_name(d: Dtype) -> String {
    format!("{d:?}").to_ascii_lowercase()
}

fn header_error(path: &Path, e: SafeTensorError, size: u64, n: u64) -> Error {
    let reason = match e {
        SafeTensorError::HeaderTooSmall => "truncated: no complete 8-byte header length".to_string(),
        SafeTensorError::HeaderTooLarge => format!("header of {n} bytes is too large"),
        SafeTensorError::InvalidHeaderLength => {
            format!("header length {n} exceeds the file size ({size} bytes): truncated or not safetensors")
        }
        SafeTensorError::InvalidHeader(_) => "header is not valid UTF-8".to_string(),
        SafeTensorError::InvalidHeaderDeserialization(err) => format!("invalid header JSON: {err}"),
        SafeTensorError::InvalidOffset(t) => {
            format!("tensor offsets out of range or overlapping (tensor {t})")
        }
        SafeTensorError::TensorInvalidInfo => "a tensor's shape does not match its byte range".to_string(),
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "tensor data does not match the file size ({size} bytes): truncated, or bytes appended after the data"
        ),
        SafeTensorError::ValidationOverflow => "tensor sizes overflow (claims an impossibly large tensor)".to_string(),
        other => format!("invalid safetensors file: {other}"),
    };
    Error::input(path, reason)
}

#[cfg(test)]
mod tests {
    use safetensors::Dtype;

    use super::{float_stats, FloatStats};

    #[test]
    fn values_beyond_a_limit_are_counted_from_the_bits_in_every_float_dtype() {
        let v = [0.0, -1e15, 1e15, 2e15, -3e20, f64::INFINITY, f64::NAN];
        let f64s: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        // ±1e15 is not beyond the limit; 2e15 and -3e20 are; ±Inf and NaN are non-finite.
        assert_eq!(float_stats(&f64s, Dtype::F64, 1e15), Some(FloatStats { nonfinite: 2, zero: false, beyond: 2 }));
        let f32s: Vec<u8> = v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
        // 1e15 rounds to 999999986991104 in f32, below the limit.
        assert_eq!(float_stats(&f32s, Dtype::F32, 1e15).unwrap().beyond, 2);
        let bf16s: Vec<u8> = v.iter().flat_map(|x| half::bf16::from_f64(*x).to_le_bytes()).collect();
        // In bf16 ±1e15 rounds down to ±9.98e14; 2e15 and 3e20 stay beyond.
        assert_eq!(float_stats(&bf16s, Dtype::BF16, 1e15).unwrap().beyond, 2);
        let f16s: Vec<u8> =
            [1.0f64, 65504.0, -65504.0].iter().flat_map(|x| half::f16::from_f64(*x).to_le_bytes()).collect();
        // f16 cannot exceed 65504: nothing is beyond 1e15, everything beyond 1e4 but the 1.
        assert_eq!(float_stats(&f16s, Dtype::F16, 1e15).unwrap().beyond, 0);
        assert_eq!(float_stats(&f16s, Dtype::F16, 1e4).unwrap().beyond, 2);
        let zeros: Vec<u8> = [0.0f32, -0.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(float_stats(&zeros, Dtype::F32, 1.0), Some(FloatStats { nonfinite: 0, zero: true, beyond: 0 }));
        assert_eq!(float_stats(&[0u8; 4], Dtype::I32, 1.0), None);
    }
}
