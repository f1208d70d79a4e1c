//! `lorascope scan`: a static screen of many adapter files for hub moderators. One JSON line
//! per file in a deterministic order, errors as records (one bad file never stops a scan),
//! risk flags with documented thresholds (docs/scan.md), stable sharding by path hash. Discovery
//! never follows a symbolic link out of a scanned tree and lists each file once (issue #14,
//! findings 4 and 14).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::load::fsguard::{self, is_entry, FileId, MAX_TEXT_BYTES};
use crate::load::metadata::Tag;
use crate::load::{ModuleKind, Tree};
use crate::named::closed_set;

/// File extensions a scan picks up: adapters, and pickle checkpoints (reported as errors, never
/// read as pickle).
const CANDIDATE_EXTS: &[&str] = &["safetensors", "bin", "pt", "pth", "ckpt", "pkl"];

/// Largest adapter a scan reads into memory (4 GiB; `--jobs` files are read at once). Larger
/// files become an error record naming the limit, unread.
pub const MAX_SCAN_ADAPTER_BYTES: u64 = 4 << 30;

closed_set! {
    /// The risk flags a record can carry (thresholds and reasons: docs/scan.md).
    pub enum Flag ("flag") {
        Unreadable = "unreadable",
        NonfiniteWeights = "nonfinite-weights",
        HashMismatch = "hash-mismatch",
        FullMatrix = "full-matrix",
        CapacityPerImage = "capacity-per-image",
        FewImagesManySteps = "few-images-many-steps",
        UnsupportedAlgorithm = "unsupported-algorithm",
        MixedNaming = "mixed-naming",
        ExtremeValues = "extreme-values",
    }
}

closed_set! {
    /// Whose fault a scan error is.
    pub enum ErrorKind ("error kind") {
        /// A bad or refused file.
        Input = "input",
        /// A file not opened at all: a symbolic link leading outside the scanned tree, or not a
        /// regular file (FIFO, socket, device).
        Skipped = "skipped",
        /// A failure of lorascope itself.
        Internal = "internal",
    }
}

/// Thresholds of the risk flags (documented in docs/scan.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlagThresholds {
    /// Compressed bytes per pixel of a typical training image (RGB at about 10:1, a good JPEG):
    /// `capacity-per-image` fires when the adapter could store this many bytes per image.
    pub bytes_per_pixel: f64,
    /// Side of the assumed square training image when the metadata gives no resolution.
    pub default_resolution: u64,
    /// `few-images-many-steps`: at most this many training images...
    pub few_images: u64,
    /// ...and at least this many optimisation steps per image.
    pub steps_per_image: f64,
}

impl Default for FlagThresholds {
    fn default() -> Self {
        FlagThresholds { bytes_per_pixel: 0.3, default_resolution: 512, few_images: 50, steps_per_image: 100.0 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanError {
    pub kind: ErrorKind,
    pub message: String,
}

/// One JSON line of a scan.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScanRecord {
    pub path: String,
    pub bytes: Option<u64>,
    pub sha256: Option<String>,
    pub autov2: Option<String>,
    /// SHA-256 of the safetensors data section (sd-scripts `sshs_model_hash`, Civitai AutoV3):
    /// equal for the same weights under other metadata or another file name, so grouping
    /// records by it finds re-uploads.
    pub content_hash: Option<String>,
    pub format: Option<String>,
    pub architecture: Option<String>,
    pub modules: Option<usize>,
    pub kinds: BTreeMap<ModuleKind, usize>,
    pub params: Option<usize>,
    pub effective_params: Option<usize>,
    pub capacity_bits: Option<f64>,
    pub train_images: Option<u64>,
    pub train_steps: Option<u64>,
    pub resolution: Option<String>,
    pub capacity_bits_per_image: Option<f64>,
    pub top_tags: Vec<Tag>,
    pub warnings: Vec<String>,
    pub flags: Vec<Flag>,
    pub error: Option<ScanError>,
}

/// A file (or PEFT directory) to scan, and the tree it was found under (`None` when the user
/// named it, on the command line or in `--list`).
#[derive(Debug, Clone)]
pub struct Candidate {
    pub path: PathBuf,
    pub tree: Option<Tree>,
}

/// Adapters under the given paths: files with a candidate extension, and PEFT directories
/// (holding `adapter_model.safetensors`) as one adapter each. Sorted by path, each file once.
///
/// A named path may be a link (the user's choice); a named directory is then a tree. Under a
/// tree, links are not walked: a link to a file inside the tree is listed once with that file
/// (by device and inode, under a name reached without a link when there is one; hard links
/// likewise), a link to a directory inside is walked under that directory's own name, and a
/// link leading outside the tree, or to nothing, is listed whatever its name so that its record
/// says it was not followed. Directories are walked once each (by device and inode), so
/// self-links and loops end.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<Candidate>> {
    struct Found {
        c: Candidate,
        id: Option<FileId>,
        via_link: bool,
    }
    fn candidate_name(p: &Path) -> bool {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| CANDIDATE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
    }
    fn id(m: std::io::Result<std::fs::Metadata>) -> Option<FileId> {
        m.ok().and_then(|m| FileId::of(&m))
    }
    fn walk(dir: &Path, tree: &Tree, dirs: &mut HashSet<FileId>, out: &mut Vec<Found>) -> Result<()> {
        let dir_id = id(std::fs::metadata(dir));
        if dir_id.is_some_and(|i| !dirs.insert(i)) {
            return Ok(());
        }
        let found = |p: &Path, id, via_link| Found {
            c: Candidate { path: p.to_path_buf(), tree: Some(tree.clone()) },
            id,
            via_link,
        };
        if is_entry(&dir.join("adapter_model.safetensors")) || is_entry(&dir.join("adapter_model.bin")) {
            out.push(found(dir, dir_id, false));
            return Ok(());
        }
        let mut entries: Vec<(PathBuf, std::fs::FileType)> = std::fs::read_dir(dir)
            .map_err(|e| Error::read(dir, "cannot list directory", e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_type().ok().map(|t| (e.path(), t)))
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (p, t) in entries {
            if t.is_dir() {
                walk(&p, tree, dirs, out)?;
            } else if t.is_symlink() {
                match tree.resolve(&p) {
                    // Inside: a directory is walked under its own name; a file is listed once.
                    Ok(target) => {
                        let m = std::fs::metadata(&target);
                        if candidate_name(&p) && !m.as_ref().is_ok_and(|m| m.is_dir()) {
                            out.push(found(&p, id(m), true));
                        }
                    }
                    Err(_) => out.push(found(&p, None, true)),
                }
            } else if candidate_name(&p) {
                out.push(found(&p, id(std::fs::symlink_metadata(&p)), false));
            }
        }
        Ok(())
    }
    let mut out = vec![];
    let mut dirs = HashSet::new();
    for p in paths {
        if p.is_dir() {
            let tree = Tree::named(p, "the scanned tree")?;
            walk(p, &tree, &mut dirs, &mut out)?;
        } else {
            // Named files are scanned whatever their extension (a missing one becomes an
            // error record).
            out.push(Found {
                c: Candidate { path: p.clone(), tree: None },
                id: id(std::fs::metadata(p)),
                via_link: false,
            });
        }
    }
    out.sort_by(|a, b| a.c.path.cmp(&b.c.path));
    // One record per file: the first path in order reached without a link, else the first.
    let mut best: HashMap<FileId, usize> = HashMap::new();
    let mut keep = vec![true; out.len()];
    for (i, f) in out.iter().enumerate() {
        let Some(fid) = f.id else { continue };
        match best.get(&fid) {
            None => {
                best.insert(fid, i);
            }
            Some(&j) if out[j].via_link && !f.via_link => {
                keep[j] = false;
                best.insert(fid, i);
            }
            Some(_) => keep[i] = false,
        }
    }
    let mut files: Vec<Candidate> = out.into_iter().zip(keep).filter(|(_, k)| *k).map(|(f, _)| f.c).collect();
    files.dedup_by(|a, b| a.path == b.path);
    Ok(files)
}

/// Paths listed in a file, one a line (blank lines and `#` comments skipped).
pub fn read_list(list: &Path) -> Result<Vec<PathBuf>> {
    let bytes = fsguard::read(list, None, MAX_TEXT_BYTES, "a list of paths")?;
    let text = String::from_utf8(bytes).map_err(|_| Error::input(list, "not valid UTF-8 text"))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(PathBuf::from).collect())
}

/// Shard `i` of `n` by a stable hash of the path string: N machines cover a hub with no
/// coordination, each file in exactly one shard.
pub fn in_shard(path: &Path, i: u64, n: u64) -> bool {
    let h = Sha256::digest(path.to_string_lossy().as_bytes());
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) % n == i
}

/// Parse `I/N` with I < N.
pub fn parse_shard(s: &str) -> std::result::Result<(u64, u64), String> {
    let (i, n) = s.split_once('/').ok_or("shard must be I/N, e.g. 0/8")?;
    let (i, n): (u64, u64) =
        (i.trim().parse().map_err(|_| "bad shard index")?, n.trim().parse().map_err(|_| "bad shard count")?);
    if n == 0 || i >= n {
        return Err(format!("shard {i}/{n}: need 0 ≤ I < N"));
    }
    Ok((i, n))
}

/// Longest image side `ss_resolution` may claim (sd-scripts trains at 512–2048; a claimed
/// 100000×100000 would only make `capacity-per-image` unreachable).
pub(crate) const MAX_RESOLUTION_SIDE: u64 = 16_384;

/// Width × height from sd-scripts' `ss_resolution` ("(512, 512)", "512,768" or "512"). A side
/// of 0 or above [`MAX_RESOLUTION_SIDE`] is not believed: the default side is used instead.
/// In f64, so no product can wrap.
fn resolution_pixels(r: Option<&str>, default_side: u64) -> f64 {
    let nums: Vec<u64> = r
        .unwrap_or("")
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(u64::MAX))
        .collect();
    let sides = match nums.as_slice() {
        [w, h, ..] => [*w, *h],
        [s] => [*s, *s],
        [] => [default_side, default_side],
    };
    if sides.iter().any(|&x| x == 0 || x > MAX_RESOLUTION_SIDE) {
        return default_side as f64 * default_side as f64;
    }
    sides[0] as f64 * sides[1] as f64
}

/// What the inspection and the spectrum of one file found, beyond the record's fields.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Findings {
    /// NaN/Inf in any module's tensors.
    pub nonfinite: bool,
    /// The recorded sshs_model_hash differs from the recomputed one.
    pub hash_mismatch: bool,
    /// The keys follow more than one naming scheme.
    pub mixed_naming: bool,
    /// A value or a scale beyond ±1e15, or the spectrum refused the values (an overflow).
    pub extreme_values: bool,
}

/// The risk flags of a filled record.
pub(crate) fn flags_for(rec: &ScanRecord, found: Findings, th: &FlagThresholds) -> Vec<Flag> {
    let mut f = vec![];
    if found.nonfinite {
        f.push(Flag::NonfiniteWeights);
    }
    if found.hash_mismatch {
        f.push(Flag::HashMismatch);
    }
    if rec.kinds.contains_key(&ModuleKind::Full) {
        f.push(Flag::FullMatrix);
    }
    if let Some(per) = rec.capacity_bits_per_image {
        let reference = resolution_pixels(rec.resolution.as_deref(), th.default_resolution) * th.bytes_per_pixel;
        if per / 8.0 >= reference {
            f.push(Flag::CapacityPerImage);
        }
    }
    if let (Some(n), Some(steps)) = (rec.train_images, rec.train_steps) {
        if n > 0 && n <= th.few_images && steps as f64 / n as f64 >= th.steps_per_image {
            f.push(Flag::FewImagesManySteps);
        }
    }
    if [ModuleKind::Oft, ModuleKind::Boft, ModuleKind::Glora].iter().any(|k| rec.kinds.contains_key(k)) {
        f.push(Flag::UnsupportedAlgorithm);
    }
    if found.mixed_naming {
        f.push(Flag::MixedNaming);
    }
    if found.extreme_values {
        f.push(Flag::ExtremeValues);
    }
    f
}
