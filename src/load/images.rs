//! Image works and controls for the image probe: a directory of PNG, JPEG or WebP files, each
//! with an optional caption sidecar `NAME.txt` (the convention of sd-scripts and kohya's
//! dataset folders). Every file is read once through `fsguard` and decoded from the bytes that
//! were hashed; decoding is bounded (pixel count and allocation), so a decompression bomb is an
//! input error, not an out-of-memory kill. Anything else in the folder is refused by name:
//! a stray file in a folder of evidence is more likely a mistake than something to skip.
//! Hidden files (`.DS_Store`, `._x.png` from macOS archives) are passed over.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::error::{Error, Result};
use crate::load::fsguard::{self, Tree, MAX_TEXT_BYTES};
use crate::load::hashes::FileDigest;

/// File extensions read as images (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// Largest image file read (bytes): a 16384² PNG of noise is about 800 MB; real artwork
/// uploads are far smaller.
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;

/// Largest side (pixels) decoded; the probe works at 512–1024 pixels, so anything larger is
/// downscaled anyway and a larger header is more likely a bomb than a painting.
pub const MAX_IMAGE_SIDE: u32 = 16384;

/// Most bytes the decoder may allocate for one image.
pub const MAX_IMAGE_ALLOC: u64 = 1 << 30;

/// Most images in one folder: each costs dozens of UNet passes, and a million-file folder
/// given by mistake should stop at once, not after hours.
pub const MAX_IMAGES: usize = 10_000;

/// Longest caption sidecar (bytes); a caption is a line of tags, not a document.
pub const MAX_CAPTION_BYTES: u64 = 64 << 10;

/// One image, decoded to 8-bit RGB at its own size (alpha dropped: the probe's VAE sees RGB).
#[derive(Debug, Clone)]
pub struct ImageWork {
    /// The file name without its extension.
    pub id: String,
    pub path: PathBuf,
    pub pixels: RgbImage,
    /// Text of `NAME.txt` beside the image, trimmed; `None` when there is none.
    pub caption: Option<String>,
    pub digest: FileDigest,
    /// The caption file and its digest, when there is one.
    pub caption_file: Option<(PathBuf, FileDigest)>,
}

/// The images of one folder, sorted by file name.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub dir: PathBuf,
    pub images: Vec<ImageWork>,
}

impl ImageSet {
    /// Every file read, with its digest (images and caption sidecars), for the report's inputs.
    pub fn files(&self) -> Vec<(&Path, &FileDigest)> {
        let mut out = vec![];
        for w in &self.images {
            out.push((w.path.as_path(), &w.digest));
            if let Some((p, d)) = &w.caption_file {
                out.push((p.as_path(), d));
            }
        }
        out
    }
}

fn extension(p: &Path) -> String {
    p.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase()
}

fn is_hidden(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// Whether `dir` is a folder with at least one image file in it (so `--works` means images).
pub fn holds_images(dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else { return false };
    rd.filter_map(|e| e.ok()).any(|e| {
        let p = e.path();
        !is_hidden(&p) && IMAGE_EXTENSIONS.contains(&extension(&p).as_str())
    })
}

/// Read every image of `dir` (`what` names the folder's role in messages: "works",
/// "controls", "style controls").
pub fn load_images(dir: &Path, what: &'static str) -> Result<ImageSet> {
    if !dir.is_dir() {
        return Err(Error::input(dir, format!("{what}: not a directory of images")));
    }
    let tree = Tree::named(dir, what)?;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::read(dir, "cannot list directory", e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .map(|e| e.path())
        .filter(|p| !is_hidden(p))
        .collect();
    entries.sort();
    let (images, captions) = split_entries(&entries)?;
    if images.is_empty() {
        return Err(Error::input(dir, format!("{what}: holds no images (PNG, JPEG or WebP)")));
    }
    if images.len() > MAX_IMAGES {
        return Err(Error::input(
            dir,
            format!("{what}: holds {} images, above the limit of {MAX_IMAGES} (MAX_IMAGES)", images.len()),
        ));
    }
    let mut out = Vec::with_capacity(images.len());
    for p in images {
        let id = p.file_stem().and_then(|s| s.to_str()).unwrap_or("image").to_string();
        let bytes = fsguard::read(&p, Some(&tree), MAX_IMAGE_FILE_BYTES, "an image file")?;
        let digest = FileDigest::of(&bytes);
        let pixels = decode(&p, &bytes)?;
        let caption_file = match captions.get(&id) {
            Some(c) => Some(read_caption(c, &tree)?),
            None => None,
        };
        let caption = caption_file.as_ref().map(|(text, _)| text.clone());
        let caption_file = caption_file.map(|(_, d)| (captions[&id].clone(), d));
        out.push(ImageWork { id, path: p, pixels, caption, digest, caption_file });
    }
    Ok(ImageSet { dir: dir.to_path_buf(), images: out })
}

/// Images and caption sidecars (by stem); any other file is an error naming it, and so is a
/// caption with no image or two images with one name.
fn split_entries(entries: &[PathBuf]) -> Result<(Vec<PathBuf>, BTreeMap<String, PathBuf>)> {
    let mut images = vec![];
    let mut captions = BTreeMap::new();
    let mut stems = BTreeMap::new();
    for p in entries {
        let ext = extension(p);
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_string();
        if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            if let Some(other) = stems.insert(stem.clone(), p.clone()) {
                return Err(Error::input(
                    p,
                    format!(
                        "two images are named {stem:?} ({}); captions and results are keyed by name",
                        other.display()
                    ),
                ));
            }
            images.push(p.clone());
        } else if ext == "txt" {
            captions.insert(stem, p.clone());
        } else {
            return Err(Error::input(
                p,
                "not an image (PNG, JPEG or WebP) or a caption (.txt): image folders hold images and their captions only",
            ));
        }
    }
    if let Some((stem, p)) = captions.iter().find(|(s, _)| !stems.contains_key(*s)) {
        return Err(Error::input(p, format!("a caption with no image named {stem:?} beside it")));
    }
    Ok((images, captions))
}

fn read_caption(p: &Path, tree: &Tree) -> Result<(String, FileDigest)> {
    let bytes = fsguard::read(p, Some(tree), MAX_CAPTION_BYTES.min(MAX_TEXT_BYTES), "a caption file")?;
    let digest = FileDigest::of(&bytes);
    let text = String::from_utf8(bytes).map_err(|_| Error::input(p, "caption is not valid UTF-8 text"))?;
    Ok((text.trim().to_string(), digest))
}

/// Decode with the format guessed from the bytes (not the extension, which uploads get wrong),
/// under size and allocation limits.
fn decode(p: &Path, bytes: &[u8]) -> Result<RgbImage> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::input(p, format!("cannot read the image: {e}")))?;
    let Some(format) = reader.format() else {
        return Err(Error::input(p, "not a PNG, JPEG or WebP image (unrecognised file signature)"));
    };
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) {
        return Err(Error::input(p, format!("a {format:?} image; the probe reads PNG, JPEG and WebP")));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    let mut reader = reader;
    reader.limits(limits);
    let img = reader.decode().map_err(|e| Error::input(p, format!("cannot decode the {format:?} image: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::input(p, "the image has no pixels"));
    }
    Ok(img.to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
        let mut out = std::io::Cursor::new(vec![]);
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn images_and_captions_are_read_and_strays_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("b.png"), png(3, 2, |x, y| [x as u8, y as u8, 7])).unwrap();
        std::fs::write(d.join("a.png"), png(2, 2, |_, _| [1, 2, 3])).unwrap();
        std::fs::write(d.join("a.txt"), "  a painting, red \n").unwrap();
        std::fs::write(d.join(".DS_Store"), "junk").unwrap();
        let set = load_images(d, "works").unwrap();
        let ids: Vec<&str> = set.images.iter().map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(set.images[0].caption.as_deref(), Some("a painting, red"));
        assert_eq!(set.images[1].caption, None);
        assert_eq!(set.images[1].pixels.get_pixel(2, 1).0, [2, 1, 7]);
        assert_eq!(set.files().len(), 3);

        std::fs::write(d.join("notes.md"), "x").unwrap();
        let e = load_images(d, "works").unwrap_err().to_string();
        assert!(e.contains("notes.md") && e.contains("not an image"), "{e}");
        std::fs::remove_file(d.join("notes.md")).unwrap();

        std::fs::write(d.join("c.txt"), "orphan").unwrap();
        let e = load_images(d, "works").unwrap_err().to_string();
        assert!(e.contains("c.txt") && e.contains("no image"), "{e}");
        std::fs::remove_file(d.join("c.txt")).unwrap();

        std::fs::write(d.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let e = load_images(d, "works").unwrap_err().to_string();
        assert!(e.contains("broken.png") && e.contains("cannot decode"), "{e}");
        std::fs::write(d.join("broken.png"), b"plain text with a png name").unwrap();
        let e = load_images(d, "works").unwrap_err().to_string();
        assert!(e.contains("broken.png") && e.contains("unrecognised"), "{e}");
    }
}
