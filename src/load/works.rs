//! Works and controls supplied by the user: a directory of `.txt` files or a JSONL file of
//! `{"id", "text"}` lines; neutral prompts, one a line. Every file is read once through
//! `fsguard` (a directory's texts must stay inside it; only regular files) and recorded with the
//! digest of the bytes that were parsed (issue #14, findings 4, 5 and 10).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::load::fsguard::{self, Tree, MAX_TEXT_BYTES};
use crate::load::hashes::{sha256_bytes, FileDigest};

#[derive(Debug, Clone)]
pub struct Work {
    pub id: String,
    pub text: String,
    /// SHA-256 of the text's UTF-8 bytes.
    pub sha256: String,
}

/// The works and the files they came from, each with the digest of the bytes read from it
/// (what the report records).
#[derive(Debug, Clone)]
pub struct WorkSet {
    pub works: Vec<Work>,
    pub files: Vec<PathBuf>,
    /// One per file, same order.
    pub digests: Vec<FileDigest>,
}

/// Neutral prompts and the file they were read from.
#[derive(Debug, Clone)]
pub struct Prompts {
    pub path: PathBuf,
    pub lines: Vec<String>,
    pub digest: FileDigest,
}

fn read_text(p: &Path, tree: Option<&Tree>) -> Result<(String, FileDigest)> {
    let bytes = fsguard::read(p, tree, MAX_TEXT_BYTES, "a text file")?;
    let digest = FileDigest::of(&bytes);
    let text = String::from_utf8(bytes).map_err(|_| Error::input(p, "not valid UTF-8 text"))?;
    Ok((text, digest))
}

const IMAGE_EXTS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// Read works (or controls) from `path`: a directory of `.txt` files (links out of it refused,
/// subdirectories passed over) or a JSONL file.
pub fn load_works(path: &Path) -> Result<WorkSet> {
    if !path.exists() {
        return Err(Error::input(path, "works: no such file or directory"));
    }
    let mut works = vec![];
    let mut files = vec![];
    let mut digests = vec![];
    if path.is_dir() {
        let tree = Tree::named(path, "the works directory")?;
        // Entries of any type but directories (not followed): a .txt that is a link out or a FIFO
        // is refused when read, not passed over.
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::read(path, "cannot list directory", e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
            .map(|e| e.path())
            .collect();
        entries.sort();
        let ext = |p: &Path| p.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        for p in entries.iter().filter(|p| ext(p) == "txt") {
            let (text, digest) = read_text(p, Some(&tree))?;
            let id = p.file_stem().and_then(|s| s.to_str()).unwrap_or("work").to_string();
            // The file holds exactly the text: one hash for both.
            works.push(Work { sha256: digest.sha256.clone(), id, text });
            files.push(p.clone());
            digests.push(digest);
        }
        if works.is_empty() {
            let images = entries.iter().filter(|p| IMAGE_EXTS.contains(&ext(p).as_str())).count();
            let why = if images > 0 {
                format!("holds {images} image(s) but no .txt works; image works are not supported yet")
            } else {
                "holds no .txt works".to_string()
            };
            return Err(Error::input(path, why));
        }
    } else {
        let (text, digest) = read_text(path, None)?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| Error::input(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
            let (Some(id), Some(t)) = (v.get("id"), v.get("text").and_then(|t| t.as_str())) else {
                return Err(Error::input(path, format!("line {}: needs \"id\" and a string \"text\"", i + 1)));
            };
            let id = id.as_str().map(String::from).unwrap_or_else(|| id.to_string());
            works.push(Work { sha256: sha256_bytes(t.as_bytes()), id, text: t.to_string() });
        }
        if works.is_empty() {
            return Err(Error::input(path, "no works in the file"));
        }
        files.push(path.to_path_buf());
        digests.push(digest);
    }
    let mut seen = BTreeSet::new();
    for w in &works {
        if !seen.insert(w.id.clone()) {
            return Err(Error::input(path, format!("work id {:?} appears twice", w.id)));
        }
    }
    Ok(WorkSet { works, files, digests })
}

/// Neutral prompts for the reproduction search: one per non-empty line of a text file.
pub fn load_prompts(path: &Path) -> Result<Prompts> {
    let (text, digest) = read_text(path, None)?;
    let lines: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if lines.is_empty() {
        return Err(Error::input(path, "holds no prompts (one per line)"));
    }
    Ok(Prompts { path: path.to_path_buf(), lines, digest })
}
