//! How close a generated image is to a work, on [0, 1] RGB pixels of the same size:
//! - RMS distance over all values;
//! - Carlini et al. (USENIX Security 2023, "Extracting Training Data from Diffusion Models",
//!   §4.2) tiled ℓ2: the image cut into 4×4 tiles, the RMS distance of each tile, the largest
//!   of them; a generation within 0.15 of a work is a near-copy in their study;
//! - the closest single tile (lorascope's partial-copy statistic: one sixteenth of the image
//!   reproduced, docs/probe.md);
//! - SSIM (Wang et al. 2004, IEEE TIP) on luminance with their 11×11 Gaussian window (σ 1.5),
//!   K1 0.01, K2 0.03, data range 1, mean over the valid window positions;
//! - the Hamming distance of 64-bit DCT perceptual hashes (`image_hasher`'s pHash).

use image::RgbImage;
use serde::{Deserialize, Serialize};

/// Distances of one generation to one work.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Similarity {
    pub rms: f64,
    pub tiled_l2: f64,
    pub best_tile: f64,
    pub ssim: f64,
    pub phash_bits: u32,
    /// Tiles (of TILES²) whose RMS distance is within the near-copy threshold.
    pub tiles_within: usize,
}

/// Tiles per side of Carlini et al.'s tiled distance.
pub const TILES: usize = 4;

/// Channel `c` of pixel (x, y) in [0, 1].
fn unit(img: &RgbImage, x: u32, y: u32, c: usize) -> f64 {
    img.get_pixel(x, y).0[c] as f64 / 255.0
}

/// Distances of `a` to `b`; `near` is the near-copy threshold the tiles are counted against.
pub(crate) fn compare(a: &RgbImage, b: &RgbImage, near: f64) -> Similarity {
    assert_eq!(a.dimensions(), b.dimensions(), "compared images have one size (the probe resizes both)");
    let tiles = tile_rms(a, b);
    Similarity {
        rms: rms_in(a, b, (0, 0, a.width(), a.height())),
        tiled_l2: tiles.iter().copied().fold(0.0, f64::max),
        best_tile: tiles.iter().copied().fold(f64::INFINITY, f64::min),
        ssim: ssim(a, b),
        phash_bits: phash_distance(a, b),
        tiles_within: tiles.iter().filter(|&&d| d <= near).count(),
    }
}

/// RMS distance over the rectangle (x0, y0, x1, y1), all three channels.
fn rms_in(a: &RgbImage, b: &RgbImage, (x0, y0, x1, y1): (u32, u32, u32, u32)) -> f64 {
    let mut sum = 0.0;
    let mut n = 0usize;
    for y in y0..y1 {
        for x in x0..x1 {
            for c in 0..3 {
                let d = unit(a, x, y, c) - unit(b, x, y, c);
                sum += d * d;
                n += 1;
            }
        }
    }
    if n == 0 {
        0.0
    } else {
        (sum / n as f64).sqrt()
    }
}

/// RMS distance of each tile of a TILES × TILES grid (boundaries at ⌊i·side/TILES⌋).
fn tile_rms(a: &RgbImage, b: &RgbImage) -> Vec<f64> {
    let (w, h) = a.dimensions();
    let edge = |i: usize, side: u32| (i as u64 * side as u64 / TILES as u64) as u32;
    let mut out = Vec::with_capacity(TILES * TILES);
    for ty in 0..TILES {
        for tx in 0..TILES {
            let rect = (edge(tx, w), edge(ty, h), edge(tx + 1, w), edge(ty + 1, h));
            if rect.2 > rect.0 && rect.3 > rect.1 {
                out.push(rms_in(a, b, rect));
            }
        }
    }
    out
}

fn luminance(img: &RgbImage) -> Vec<f64> {
    // ITU-R BT.601 weights, as Wang et al.'s reference code on colour images (rgb2gray).
    img.pixels().map(|p| (0.299 * p.0[0] as f64 + 0.587 * p.0[1] as f64 + 0.114 * p.0[2] as f64) / 255.0).collect()
}

/// Mean SSIM over every position of the Gaussian window that fits inside the image (Wang et
/// al.'s `filter2(..., 'valid')`); images smaller than the window use one window their size.
pub(crate) fn ssim(a: &RgbImage, b: &RgbImage) -> f64 {
    let (w, h) = (a.width() as usize, a.height() as usize);
    let (la, lb) = (luminance(a), luminance(b));
    let size = 11.min(w).min(h);
    let kernel = gaussian(size, 1.5);
    let (c1, c2) = ((0.01f64).powi(2), (0.03f64).powi(2));
    let mut total = 0.0;
    let mut count = 0usize;
    for y0 in 0..=(h - size) {
        for x0 in 0..=(w - size) {
            let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for dy in 0..size {
                for dx in 0..size {
                    let k = kernel[dy * size + dx];
                    let (va, vb) = (la[(y0 + dy) * w + x0 + dx], lb[(y0 + dy) * w + x0 + dx]);
                    ma += k * va;
                    mb += k * vb;
                    saa += k * va * va;
                    sbb += k * vb * vb;
                    sab += k * va * vb;
                }
            }
            let (va, vb, cov) = (saa - ma * ma, sbb - mb * mb, sab - ma * mb);
            total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2));
            count += 1;
        }
    }
    total / count as f64
}

/// A size × size Gaussian window with standard deviation `sigma`, summing to 1.
fn gaussian(size: usize, sigma: f64) -> Vec<f64> {
    let c = (size as f64 - 1.0) / 2.0;
    let mut k: Vec<f64> = (0..size * size)
        .map(|i| {
            let (x, y) = ((i % size) as f64 - c, (i / size) as f64 - c);
            (-(x * x + y * y) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let s: f64 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    k
}

fn phash_distance(a: &RgbImage, b: &RgbImage) -> u32 {
    let hasher = image_hasher::HasherConfig::new()
        .hash_size(8, 8)
        .preproc_dct()
        .hash_alg(image_hasher::HashAlg::Mean)
        .to_hasher();
    let ha = hasher.hash_image(&image::DynamicImage::ImageRgb8(a.clone()));
    let hb = hasher.hash_image(&image::DynamicImage::ImageRgb8(b.clone()));
    ha.dist(&hb)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, image::Rgb([v, v, v]))
    }

    #[test]
    fn distances_by_hand() {
        let a = solid(16, 16, 0);
        let b = solid(16, 16, 51); // 0.2 everywhere
        let s = compare(&a, &b, 0.15);
        assert!((s.rms - 0.2).abs() < 1e-12 && (s.tiled_l2 - 0.2).abs() < 1e-12 && (s.best_tile - 0.2).abs() < 1e-12);
        // Constant images: SSIM = (2ab + C1) / (a² + b² + C1) (the variance terms are C2/C2).
        let c1 = 1e-4;
        assert!((s.ssim - c1 / (0.04 + c1)).abs() < 1e-9, "{}", s.ssim);
        assert_eq!(compare(&a, &a, 0.15).ssim, 1.0);
        // One tile of 16 changed by 1.0 (255): that tile's RMS is 1, the whole image's 1/4.
        let mut c = a.clone();
        for y in 0..4 {
            for x in 0..4 {
                c.put_pixel(x, y, image::Rgb([255, 255, 255]));
            }
        }
        let s = compare(&a, &c, 0.15);
        assert!((s.tiled_l2 - 1.0).abs() < 1e-12 && s.best_tile == 0.0 && (s.rms - 0.25).abs() < 1e-12);
        assert_eq!(s.tiles_within, 15);
        assert_eq!(compare(&c, &c, 0.15).phash_bits, 0);
    }

    #[test]
    fn the_gaussian_window_is_wangs() {
        let k = gaussian(11, 1.5);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // Centre over a neighbour: e^(1/(2·1.5²)).
        assert!((k[60] / k[61] - (1.0 / 4.5f64).exp()).abs() < 1e-12);
    }
}
