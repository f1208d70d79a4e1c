//! A walk over a GGUF file's header before candle's reader sees it. candle's
//! `gguf_file::Content::read` trusts the header: `general.alignment = 0` divides by zero (a
//! panic), and a string or array length near u64::MAX is allocated as declared (an abort).
//! This walk reads every length and count, checks it against the bytes the file has left and
//! against documented limits, and checks the alignment, so that candle only ever reads a header
//! whose sizes are possible. Layout: the GGUF specification (ggml `docs/gguf.md`: magic,
//! version, tensor and key/value counts, typed values, tensor infos) and candle's reader
//! (`candle-core/src/quantized/gguf_file.rs`: versions 1–3, v1 with 32-bit counts).

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Most key/value pairs and most tensors a GGUF header may declare (real files have a few
/// dozen keys and at most a few thousand tensors).
pub(crate) const MAX_GGUF_ENTRIES: u64 = 1 << 20;
/// Deepest nesting of arrays in a value (real files nest none).
const MAX_ARRAY_DEPTH: u32 = 4;
/// Most dimensions of a tensor (ggml's GGML_MAX_DIMS is 4).
const MAX_DIMS: u32 = 8;

struct Walk<R> {
    r: R,
    /// Bytes of the file not yet read.
    left: u64,
    /// Version 1 writes counts and lengths as u32.
    v1: bool,
}

type Found = std::result::Result<(), String>;

impl<R: Read> Walk<R> {
    fn bytes<const N: usize>(&mut self) -> std::result::Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|_| "header ends before its declared contents".to_string())?;
        self.left = self.left.saturating_sub(N as u64);
        Ok(b)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    /// A count or length: u32 in version 1, u64 after.
    fn len(&mut self) -> std::result::Result<u64, String> {
        if self.v1 {
            Ok(u64::from(self.u32()?))
        } else {
            self.u64()
        }
    }
    /// Skip `n` bytes that the file must still hold.
    fn skip(&mut self, n: u64, what: &str) -> Found {
        if n > self.left {
            return Err(format!("{what} declares {n} bytes, more than the {} left in the file", self.left));
        }
        let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink()).map_err(|e| e.to_string())?;
        if copied != n {
            return Err(format!("{what} is cut short"));
        }
        self.left -= n;
        Ok(())
    }
    fn string(&mut self, what: &str) -> std::result::Result<Vec<u8>, String> {
        let n = self.len()?;
        if n > self.left {
            return Err(format!("{what} declares {n} bytes, more than the {} left in the file", self.left));
        }
        let mut s = vec![0u8; n as usize];
        self.r.read_exact(&mut s).map_err(|_| format!("{what} is cut short"))?;
        self.left -= n;
        Ok(s)
    }

    /// One typed value; returns it as u64 when it is an unsigned integer of 32 bits (the type
    /// `general.alignment` must have).
    fn value(&mut self, ty: u32, depth: u32) -> std::result::Result<Option<u32>, String> {
        let fixed = |t: u32| match t {
            0 | 1 | 7 => Some(1u64),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        match ty {
            4 => return Ok(Some(self.u32()?)),
            8 => {
                // Only a key's bytes are needed; a value's are skipped, not allocated.
                let n = self.len()?;
                self.skip(n, "a string value")?;
            }
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let elem = self.u32()?;
                let n = self.len()?;
                match fixed(elem) {
                    Some(size) => self.skip(n.checked_mul(size).ok_or("array size overflows")?, "an array")?,
                    None if elem == 8 || elem == 9 => {
                        // Each element holds at least its 4- or 8-byte length.
                        if n > self.left / 4 {
                            return Err(format!("an array declares {n} elements, more than the file can hold"));
                        }
                        for _ in 0..n {
                            self.value(elem, depth + 1)?;
                        }
                    }
                    None => return Err(format!("array element type {elem} is not a GGUF type")),
                }
            }
            t => match fixed(t) {
                Some(size) => self.skip(size, "a value")?,
                None => return Err(format!("value type {t} is not a GGUF type")),
            },
        }
        Ok(None)
    }

    fn header(&mut self) -> Found {
        if &self.bytes::<4>()? != b"GGUF" {
            return Err("no GGUF magic".into());
        }
        let version = self.u32()?;
        if !(1..=3).contains(&version) {
            return Err(format!("GGUF version {version} is not 1, 2 or 3"));
        }
        self.v1 = version == 1;
        let tensors = self.len()?;
        let kvs = self.len()?;
        for (what, n) in [("tensors", tensors), ("metadata keys", kvs)] {
            if n > MAX_GGUF_ENTRIES || n > self.left {
                return Err(format!(
                    "declares {n} {what}, more than the file or the limit of {MAX_GGUF_ENTRIES} allows"
                ));
            }
        }
        for _ in 0..kvs {
            let key = self.string("a metadata key")?;
            let ty = self.u32()?;
            let v = self.value(ty, 0)?;
            if key == b"general.alignment" {
                match v {
                    Some(a) if a.is_power_of_two() => {}
                    _ => {
                        return Err("general.alignment must be a power of two stored as u32 (0 divides by zero)".into())
                    }
                }
            }
        }
        for _ in 0..tensors {
            self.string("a tensor name")?;
            let dims = self.u32()?;
            if dims == 0 || dims > MAX_DIMS {
                return Err(format!("a tensor declares {dims} dimensions (1 to {MAX_DIMS} are possible)"));
            }
            for _ in 0..dims {
                self.len()?;
            }
            self.bytes::<12>()?; // ggml type (u32) and data offset (u64)
        }
        Ok(())
    }
}

/// Check `path`'s GGUF header before candle reads it; the error names the file and what is
/// impossible about the header.
/// `file` is the opened file, read from its current position (the start).
pub(crate) fn check_gguf_header(path: &Path, file: &std::fs::File) -> Result<()> {
    let size = file.metadata().map_err(|e| Error::read(path, "cannot stat", e))?.len();
    let mut w = Walk { r: std::io::BufReader::new(file), left: size, v1: false };
    w.header().map_err(|m| Error::input(path, format!("malformed GGUF header: {m}")))
}

/// The same check on bytes in memory (tests).
#[cfg(test)]
fn check_bytes(b: &[u8]) -> Found {
    Walk { r: b, left: b.len() as u64, v1: false }.header()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version-3 header with one u32 key/value and no tensors.
    fn header(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key.as_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(value);
        b
    }

    #[test]
    fn alignment_must_be_a_power_of_two() {
        assert_eq!(check_bytes(&header("general.alignment", 4, &32u32.to_le_bytes())), Ok(()));
        let e = check_bytes(&header("general.alignment", 4, &0u32.to_le_bytes())).unwrap_err();
        assert!(e.contains("general.alignment"), "{e}");
        assert!(check_bytes(&header("general.alignment", 4, &24u32.to_le_bytes())).is_err());
    }

    #[test]
    fn lengths_beyond_the_file_are_refused() {
        // A string value declaring u64::MAX bytes.
        let e = check_bytes(&header("general.name", 8, &u64::MAX.to_le_bytes())).unwrap_err();
        assert!(e.contains("more than the"), "{e}");
        // An array of 2^40 u32 elements.
        let mut v = 4u32.to_le_bytes().to_vec();
        v.extend((1u64 << 40).to_le_bytes());
        assert!(check_bytes(&header("x", 9, &v)).is_err());
        // A truncated header.
        let full = header("general.alignment", 4, &32u32.to_le_bytes());
        assert!(check_bytes(&full[..full.len() - 2]).is_err());
    }
}
