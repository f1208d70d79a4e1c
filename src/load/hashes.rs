//! File hashes a court or a hub can check: SHA-256 of the whole file, Civitai's AutoV1/AutoV2,
//! and sd-scripts' `sshs_model_hash` (SHA-256 of the tensor data, ignoring the header so that
//! metadata edits do not change it). Recorded inputs carry a `FileDigest` of the very bytes
//! that were parsed (issue #14, finding 10).

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SHA-256 and size of bytes that were read: what a report records for an input file, computed
/// from the same read that was parsed, so that the record describes what was analysed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    pub sha256: String,
    pub bytes: u64,
}

impl FileDigest {
    pub(crate) fn of(bytes: &[u8]) -> Self {
        FileDigest { sha256: sha256_bytes(bytes), bytes: bytes.len() as u64 }
    }

    /// [`FileDigest::of`] in pieces of `piece` bytes, calling `after(offset, len)` once each
    /// piece is hashed (a mapped file drops the piece's pages there).
    pub(crate) fn of_pieces(bytes: &[u8], piece: usize, mut after: impl FnMut(usize, usize)) -> Self {
        let mut h = Sha256::new();
        for (i, p) in bytes.chunks(piece.max(1)).enumerate() {
            h.update(p);
            after(i * piece.max(1), p.len());
        }
        FileDigest { sha256: hex(&h.finalize()), bytes: bytes.len() as u64 }
    }
}

/// Streamed SHA-256 of a file of any size (1 MiB reads), opened through `fsguard` (a regular
/// file only: a FIFO or device in its place is an error, never a hang).
pub(crate) fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let o = super::fsguard::open(path, None)?;
    let d = sha256_stream(&o.file, path)?;
    Ok((d.sha256, d.bytes))
}

/// Streamed SHA-256 of everything `f` yields; `path` names it in errors.
pub(crate) fn sha256_stream(mut f: impl Read, path: &Path) -> Result<FileDigest> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::read(path, "read error", e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        h.update(&buf[..n]);
    }
    Ok(FileDigest { sha256: hex(&h.finalize()), bytes: total })
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SshsCheck {
    pub recorded: String,
    pub computed: String,
    pub matches: bool,
}

/// The check of sd-scripts' `sshs_legacy_hash`: the first 8 hex digits of the SHA-256 of the
/// 64 KiB at offset 1 MiB of the file as sd-scripts re-serialised it before saving (tensors
/// plus only the `ss_` metadata). Where those bytes lie depends on that header's length, which
/// safetensors ≥ 0.3 pads with spaces to a multiple of 8 and older versions did not: both are
/// tried, and `convention` says which one matched. The hash sees only where the tensor data
/// starts and 64 KiB of it: an `ss_` edit that keeps the padded header length, or a change to
/// tensor bytes outside that window, leaves it unchanged; `sshs_model_hash` is the strong check.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LegacyCheck {
    pub recorded: String,
    /// The hash under the padded (current) header; `None` when it cannot be recomputed (the
    /// re-serialised header reaches past 1 MiB, where its key order would matter).
    pub computed: Option<String>,
    pub matches: bool,
    /// `padded header` or `unpadded header` (safetensors < 0.3) when it matches.
    pub convention: Option<String>,
}

/// `sshs_legacy_hash` (sd-scripts `library/train_util.py`, `addnet_hash_legacy`) of a file whose
/// training-time header is `header` and whose tensors, in that header's order, are `parts` of
/// `data`, with `header` padded as the given convention does.
pub(crate) fn legacy_hash(header_len: usize, parts: &[&[u8]]) -> Option<String> {
    const START: usize = 1 << 20;
    const LEN: usize = 64 << 10;
    let data_start = header_len.checked_add(8).filter(|s| *s <= START)?;
    // The window [1 MiB, 1 MiB + 64 KiB) of the re-serialised file, inside its data section.
    let (mut skip, mut want) = (START - data_start, LEN);
    let mut h = Sha256::new();
    for p in parts {
        if want == 0 {
            break;
        }
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        let take = (p.len() - skip).min(want);
        h.update(&p[skip..skip + take]);
        want -= take;
        skip = 0;
    }
    Some(hex(&h.finalize())[..8].to_string())
}

/// Check a recorded `sshs_legacy_hash` against both header conventions.
pub(crate) fn check_legacy(recorded: &str, header_len: usize, parts: &[&[u8]]) -> LegacyCheck {
    let padded = header_len.checked_next_multiple_of(8).and_then(|l| legacy_hash(l, parts));
    let unpadded = legacy_hash(header_len, parts);
    let same = |c: &Option<String>| c.as_deref().is_some_and(|c| recorded.trim().eq_ignore_ascii_case(c));
    let convention = if same(&padded) {
        Some("padded header")
    } else if same(&unpadded) {
        Some("unpadded header")
    } else {
        None
    };
    LegacyCheck {
        recorded: recorded.to_string(),
        computed: padded,
        matches: convention.is_some(),
        convention: convention.map(str::to_string),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileHashes {
    pub sha256: String,
    /// First 10 hex digits of the SHA-256 (Civitai AutoV2).
    pub autov2: String,
    /// First 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (A1111 legacy / AutoV1),
    /// of whatever bytes are there: `e3b0c442` (the empty input) for every file under 1 MiB.
    pub autov1: Option<String>,
    /// SHA-256 of the tensor data section (sd-scripts `sshs_model_hash`, Civitai AutoV3):
    /// computed when the file records an `sshs_model_hash` or when asked (`--autov3`).
    pub autov3: Option<String>,
    pub sshs_model_hash: Option<SshsCheck>,
    pub sshs_legacy_hash: Option<LegacyCheck>,
}

/// A1111's legacy `model_hash` (Civitai AutoV1): seek to 1 MiB, read up to 64 KiB, SHA-256,
/// first 8 hex digits (stable-diffusion-webui `modules/sd_models.py`). A short file gives the
/// hash of what is there, the empty input for a file under 1 MiB, as A1111 and Civitai show.
pub(crate) fn autov1(bytes: &[u8]) -> String {
    let start = bytes.len().min(1 << 20);
    let end = bytes.len().min((1 << 20) + (64 << 10));
    sha256_bytes(&bytes[start..end])[..8].to_string()
}

/// Hashes of an in-memory (memory-mapped) file; `data_section` is the bytes after the header
/// for safetensors files, hashed for AutoV3 only when given (a second full pass over the file).
pub(crate) fn file_hashes(bytes: &[u8], data_section: Option<&[u8]>, recorded_sshs: Option<&str>) -> FileHashes {
    let sha256 = sha256_bytes(bytes);
    let autov1 = Some(autov1(bytes));
    let autov3 = data_section.map(sha256_bytes);
    let sshs_model_hash = match (recorded_sshs, &autov3) {
        (Some(rec), Some(comp)) => Some(SshsCheck {
            recorded: rec.to_string(),
            computed: comp.clone(),
            matches: rec.trim().eq_ignore_ascii_case(comp),
        }),
        _ => None,
    };
    FileHashes { autov2: sha256[..10].to_string(), sha256, autov1, autov3, sshs_model_hash, sshs_legacy_hash: None }
}

#[cfg(test)]
mod legacy_tests {
    use super::*;

    #[test]
    fn unpadded_headers_of_old_safetensors_are_recognised() {
        // Data in two tensors; a 13-byte header puts the window at data offset 2^20 − 21.
        let data: Vec<u8> = (0..(1usize << 21)).map(|i| (i * 7 % 251) as u8).collect();
        let (a, b) = data.split_at(1000);
        let start = (1 << 20) - 8 - 13;
        let want = sha256_bytes(&data[start..start + (64 << 10)])[..8].to_string();
        let c = check_legacy(&want, 13, &[a, b]);
        assert!(c.matches);
        assert_eq!(c.convention.as_deref(), Some("unpadded header"));
        // Padded to 16 bytes the window starts 3 bytes later: another hash.
        assert_ne!(c.computed.as_deref(), Some(want.as_str()));
        // A header past 1 MiB cannot be recomputed (its key order would be hashed).
        assert_eq!(legacy_hash(1 << 20, &[a, b]), None);
        assert!(!check_legacy(&want, usize::MAX, &[]).matches);
    }
}
