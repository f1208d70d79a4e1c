//! Works and controls supplied by the user: a directory of `.txt` files or a JSONL file of
//! `{"id", "text"}` lines.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::load::hashes::sha256_bytes;

#[derive(Debug, Clone)]
pub struct Work {
    pub id: String,
    pub text: String,
    /// SHA-256 of the text's UTF-8 bytes.
    pub sha256: String,
}

/// The works and the files they came from (each to be recorded with its hash).
#[derive(Debug, Clone)]
pub struct WorkSet {
    pub works: Vec<Work>,
    pub files: Vec<PathBuf>,
}

const IMAGE_EXTS: &[&str] = &["png", "jpg", "jpeg", "webp"];

pub fn load_works(path: &Path) -> Result<WorkSet> {
    if !path.exists() {
        return Err(Error::input(path, "works: no such file or directory"));
    }
    let mut works = vec![];
    let mut files = vec![];
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::read(path, "cannot list directory", e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        entries.sort();
        let ext = |p: &Path| p.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        for p in entries.iter().filter(|p| ext(p) == "txt") {
            let bytes = std::fs::read(p).map_err(|e| Error::read(p, "cannot read", e))?;
            let text = String::from_utf8(bytes).map_err(|_| Error::input(p, "not valid UTF-8 text"))?;
            let id = p.file_stem().and_then(|s| s.to_str()).unwrap_or("work").to_string();
            works.push(Work { sha256: sha256_bytes(text.as_bytes()), id, text });
            files.push(p.clone());
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
        let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, "cannot read as UTF-8 text", e))?;
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
    }
    let mut seen = BTreeSet::new();
    for w in &works {
        if !seen.insert(w.id.clone()) {
            return Err(Error::input(path, format!("work id {:?} appears twice", w.id)));
        }
    }
    Ok(WorkSet { works, files })
}

/// Neutral prompts for the reproduction search: one per non-empty line of a text file.
pub fn load_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, "cannot read as UTF-8 text", e))?;
    let prompts: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if prompts.is_empty() {
        return Err(Error::input(path, "holds no prompts (one per line)"));
    }
    Ok(prompts)
}
