//! `--generate SEEDS`: for every work, DDIM samples from its caption under base and merged with
//! the same seeds (the same starting noise, from lorascope's generator), decoded to pixels and
//! compared with every image of the probe (docs/probe.md, "Generations"). Each image then
//! records its closest generation under each model; the PNGs travel in the report.

use base64::Engine;
use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::error::Result;
use crate::model::{cerr, SdModel};
use crate::rng::Rng;

use super::super::pair::Pair;
use super::super::Progress;
use super::denoise::{values, LatentShape, Subject};
use super::similarity::{compare, Similarity};
use super::{pixels, Closest, Generation, GenerationModel, ImageEvidence, ImageRole, ImageSettings, Picture};

/// Run the generations, fill each image's closest ones; returns them and the UNet calls made.
pub(crate) fn run(
    models: Pair<&SdModel>,
    subjects: &[Subject],
    evidence: &mut [ImageEvidence],
    shape: LatentShape,
    settings: &ImageSettings,
    progress: &dyn Progress,
) -> Result<(Vec<Generation>, Vec<Picture>, usize)> {
    let works: Vec<&Subject> = subjects.iter().filter(|s| s.role == ImageRole::Work).collect();
    progress.stage("generate", (2 * works.len() * settings.generate_seeds.len()) as u64);
    let mut generations = vec![];
    let mut pictures = vec![];
    let both = [(models.base, GenerationModel::Base), (models.merged, GenerationModel::Merged)];
    for w in &works {
        // Each model's embeddings of the caption and of the empty caption, once per work.
        let contexts = both
            .iter()
            .map(|(m, _)| Ok((m.encode_text(&[w.caption.as_str()])?, m.encode_text(&[""])?)))
            .collect::<Result<Vec<_>>>()?;
        for &seed in &settings.generate_seeds {
            let start = start_noise(seed, shape)?;
            for (&(model, which), (cond, uncond)) in both.iter().zip(&contexts) {
                let img = sample(model, cond, uncond, &start, settings)?;
                let png = png_bytes(&img)?;
                generations.push(Generation {
                    caption_of: w.id.clone(),
                    seed,
                    model: which,
                    sha256: crate::load::hashes::sha256_bytes(&png),
                    png_base64: base64::engine::general_purpose::STANDARD.encode(&png),
                });
                pictures.push(img);
                progress.inc(1);
            }
        }
    }
    for (e, s) in evidence.iter_mut().zip(subjects) {
        e.closest_base = closest(&generations, &pictures, &s.fitted, GenerationModel::Base, settings.copy_distance);
        e.closest_merged = closest(&generations, &pictures, &s.fitted, GenerationModel::Merged, settings.copy_distance);
    }
    let passes = generations.len() * settings.ddim_steps;
    let shown = works
        .iter()
        .map(|w| {
            Ok(Picture {
                id: w.id.clone(),
                png_base64: base64::engine::general_purpose::STANDARD.encode(png_bytes(&w.fitted)?),
            })
        })
        .collect::<Result<Vec<Picture>>>()?;
    Ok((generations, shown, passes))
}

/// The generation of `which` with the smallest tiled ℓ2 distance to `target` (ties: the first).
fn closest(
    gens: &[Generation],
    pictures: &[RgbImage],
    target: &RgbImage,
    which: GenerationModel,
    near: f64,
) -> Option<Closest> {
    let mut best: Option<Closest> = None;
    for (i, (_, p)) in gens.iter().zip(pictures).enumerate().filter(|(_, (g, _))| g.model == which) {
        let similarity: Similarity = compare(p, target, near);
        if best.as_ref().is_none_or(|b| similarity.tiled_l2 < b.similarity.tiled_l2) {
            best = Some(Closest { generation: i, similarity });
        }
    }
    best
}

/// The starting latent for a seed: standard normal draws in C, H, W order.
fn start_noise(seed: u64, (c, h, w): LatentShape) -> Result<Tensor> {
    let mut rng = Rng::new(seed);
    let v: Vec<f32> = (0..c * h * w).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, (1, c, h, w), &Device::Cpu).map_err(cerr)
}

fn sample(model: &SdModel, cond: &Tensor, uncond: &Tensor, start: &Tensor, s: &ImageSettings) -> Result<RgbImage> {
    let z = model.sample_ddim(start, cond, uncond, s.ddim_steps, s.guidance)?;
    let x = model.decode_latents(&z)?;
    let side = x.dim(3).map_err(cerr)? as u32;
    Ok(pixels::from_unit_range(&values(&x)?, side))
}

fn png_bytes(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(vec![]);
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| crate::error::Error::Runtime { what: "PNG encoding".into(), source: Box::new(e) })?;
    Ok(out.into_inner())
}
