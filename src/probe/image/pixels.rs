//! Images to the model's input: resized so the shorter side is the model's resolution R
//! (a triangle filter whose support widens with the scale factor, i.e. antialiased bilinear,
//! as torchvision's `Resize` on PIL images that diffusers' training scripts use), then the
//! central R × R square (torchvision's `CenterCrop`: offset round((side − R)/2)), then
//! value/127.5 − 1 per channel, CHW. Images the rule would distort beyond recognition are
//! refused by name: a side under R/4 (enlarged more than 4×) or an aspect ratio beyond 4:1
//! (the crop would keep less than a quarter of it).

use image::imageops::FilterType;
use image::RgbImage;

use crate::error::{Error, Result};
use crate::load::images::ImageWork;

/// Largest enlargement accepted (shorter side at least R / this).
pub const MAX_UPSCALE: u32 = 4;
/// Largest ratio of the longer side to the shorter one.
pub const MAX_ASPECT: u32 = 4;

/// The R × R image the model sees.
pub(crate) fn fit(work: &ImageWork, r: u32) -> Result<RgbImage> {
    let (w, h) = work.pixels.dimensions();
    let (short, long) = (w.min(h), w.max(h));
    if short.saturating_mul(MAX_UPSCALE) < r {
        return Err(Error::input(
            &work.path,
            format!(
                "{w}×{h} pixels: too small for the model's {r}×{r} (it would be enlarged more than {MAX_UPSCALE}×)"
            ),
        ));
    }
    if long > short.saturating_mul(MAX_ASPECT) {
        return Err(Error::input(
            &work.path,
            format!("{w}×{h} pixels: an aspect ratio beyond {MAX_ASPECT}:1; crop it to the part that matters first"),
        ));
    }
    Ok(resize_and_crop(&work.pixels, r))
}

fn resize_and_crop(img: &RgbImage, r: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let resized = if w.min(h) == r {
        img.clone()
    } else {
        // Shorter side to r, the other rounded as torchvision does (int(r * long / short)).
        let (nw, nh) = if w <= h {
            (r, (r as u64 * h as u64 / w as u64) as u32)
        } else {
            ((r as u64 * w as u64 / h as u64) as u32, r)
        };
        image::imageops::resize(img, nw, nh, FilterType::Triangle)
    };
    let (rw, rh) = resized.dimensions();
    let left = ((rw - r) as f64 / 2.0).round() as u32;
    let top = ((rh - r) as f64 / 2.0).round() as u32;
    image::imageops::crop_imm(&resized, left, top, r, r).to_image()
}

/// CHW values in [−1, 1] (x / 127.5 − 1), as the SD VAE was trained on.
pub(crate) fn to_unit_range(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let mut out = vec![0f32; 3 * (w * h) as usize];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            out[c * (w * h) as usize + (y * w + x) as usize] = p.0[c] as f32 / 127.5 - 1.0;
        }
    }
    out
}

/// The inverse for decoded images: clamp to [−1, 1], back to 8 bits, rounding.
pub(crate) fn from_unit_range(values: &[f32], side: u32) -> RgbImage {
    let plane = (side * side) as usize;
    RgbImage::from_fn(side, side, |x, y| {
        let i = (y * side + x) as usize;
        let v = |c: usize| ((values[c * plane + i].clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8;
        image::Rgb([v(0), v(1), v(2)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(w: u32, h: u32) -> ImageWork {
        ImageWork {
            id: "w".into(),
            path: "w.png".into(),
            pixels: RgbImage::from_fn(w, h, |x, _| image::Rgb([(x % 256) as u8, 0, 255])),
            caption: None,
            digest: crate::load::hashes::FileDigest::of(b""),
            caption_file: None,
        }
    }

    #[test]
    fn the_centre_square_at_the_resolution() {
        // 40×32 at R = 32: no resize, the crop starts at round(8/2) = 4.
        let img = fit(&work(40, 32), 32).unwrap();
        assert_eq!(img.dimensions(), (32, 32));
        assert_eq!(img.get_pixel(0, 0).0, [4, 0, 255]);
        // Downscaled: 64×128 → 32×64 → rows 16..48.
        assert_eq!(fit(&work(64, 128), 32).unwrap().dimensions(), (32, 32));
        let v = to_unit_range(&img);
        assert_eq!((v[0], v[32 * 32 * 2]), (4.0 / 127.5 - 1.0, 1.0));
        assert_eq!(from_unit_range(&v, 32), img);
    }

    #[test]
    fn distorting_sizes_are_refused_by_name() {
        let e = fit(&work(7, 7), 32).unwrap_err().to_string();
        assert!(e.contains("w.png") && e.contains("too small"), "{e}");
        let e = fit(&work(200, 40), 32).unwrap_err().to_string();
        assert!(e.contains("w.png") && e.contains("aspect ratio"), "{e}");
        assert!(fit(&work(8, 8), 32).is_ok());
    }
}
