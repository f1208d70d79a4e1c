//! Independent references for tests: raw tensors read straight from the safetensors bytes and
//! plain-loop matrix arithmetic, sharing no code with lorascope's own loading and algebra.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A row-major matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct M {
    pub r: usize,
    pub c: usize,
    pub v: Vec<f64>,
}

impl M {
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.v[i * self.c + j]
    }
    pub fn matmul(&self, o: &M) -> M {
        assert_eq!(self.c, o.r);
        let mut v = vec![0.0; self.r * o.c];
        for i in 0..self.r {
            for k in 0..self.c {
                for j in 0..o.c {
                    v[i * o.c + j] += self.at(i, k) * o.at(k, j);
                }
            }
        }
        M { r: self.r, c: o.c, v }
    }
    pub fn t(&self) -> M {
        let mut v = vec![0.0; self.v.len()];
        for i in 0..self.r {
            for j in 0..self.c {
                v[j * self.r + i] = self.at(i, j);
            }
        }
        M { r: self.c, c: self.r, v }
    }
    pub fn scale(&self, s: f64) -> M {
        M { r: self.r, c: self.c, v: self.v.iter().map(|x| x * s).collect() }
    }
    pub fn hadamard(&self, o: &M) -> M {
        assert_eq!((self.r, self.c), (o.r, o.c));
        M { r: self.r, c: self.c, v: self.v.iter().zip(&o.v).map(|(a, b)| a * b).collect() }
    }
    pub fn add(&self, o: &M) -> M {
        M { r: self.r, c: self.c, v: self.v.iter().zip(&o.v).map(|(a, b)| a + b).collect() }
    }
    pub fn sub(&self, o: &M) -> M {
        M { r: self.r, c: self.c, v: self.v.iter().zip(&o.v).map(|(a, b)| a - b).collect() }
    }
    pub fn kron(&self, o: &M) -> M {
        let (r, c) = (self.r * o.r, self.c * o.c);
        let mut v = vec![0.0; r * c];
        for i in 0..self.r {
            for j in 0..self.c {
                for k in 0..o.r {
                    for l in 0..o.c {
                        v[(i * o.r + k) * c + j * o.c + l] = self.at(i, j) * o.at(k, l);
                    }
                }
            }
        }
        M { r, c, v }
    }
}

/// Raw tensor values and shape from a safetensors file, decoded here from the bytes.
pub fn raw(path: &Path, name: &str) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let info = &header[name];
    assert!(!info.is_null(), "{name} not in {}", path.display());
    let shape: Vec<usize> = info["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let off = info["data_offsets"].as_array().unwrap();
    let (s, e) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
    let data = &bytes[8 + n + s..8 + n + e];
    let v = match info["dtype"].as_str().unwrap() {
        "F32" => data.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        "F16" => data.chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        "BF16" => data.chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
        d => panic!("dtype {d}"),
    };
    (shape, v)
}

/// A tensor as a matrix `[shape[0], rest]`.
pub fn mat(path: &Path, name: &str) -> M {
    let (s, v) = raw(path, name);
    let r = s.first().copied().unwrap_or(1);
    M { r, c: v.len() / r.max(1), v }
}

pub fn scalar(path: &Path, name: &str) -> f64 {
    raw(path, name).1[0]
}

/// Max |a − b| relative to max |b| (or absolute when b is tiny).
pub fn assert_close(got: &nalgebra::DMatrix<f64>, want: &M, tol: f64) {
    assert_eq!((got.nrows(), got.ncols()), (want.r, want.c), "shape");
    let scale = want.v.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
    let mut worst = 0.0f64;
    for i in 0..want.r {
        for j in 0..want.c {
            worst = worst.max((got[(i, j)] - want.at(i, j)).abs());
        }
    }
    assert!(worst / scale <= tol, "max abs error {worst:e} (scale {scale:e}) above {tol:e}");
}

/// The binary under test; `LORASCOPE_TEST_BIN` points the CLI tests at another build (to show
/// that a regression test fails on the code before its fix).
pub fn bin() -> &'static str {
    match std::env::var("LORASCOPE_TEST_BIN") {
        Ok(b) => Box::leak(b.into_boxed_str()),
        Err(_) => env!("CARGO_BIN_EXE_lorascope"),
    }
}

/// Frobenius cosine ⟨A, B⟩ / (‖A‖‖B‖) of two dense matrices, by plain loops over the entries.
pub fn frobenius_cosine(a: &M, b: &M) -> f64 {
    assert_eq!((a.r, a.c), (b.r, b.c), "shape");
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (x, y) in a.v.iter().zip(&b.v) {
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt())
}
