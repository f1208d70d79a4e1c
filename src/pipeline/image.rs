//! `probe` and `report --works` on an image base (docs/probe.md, "Image adapters"): read the
//! image folders, load the Stable Diffusion base and the merged model, run the image probe, and
//! record every image and caption file with the digest of the bytes that were decoded.

use std::path::Path;

use crate::error::{Error, Result};
use crate::load::images::{holds_images, load_images, ImageSet};
use crate::load::{Adapter, BaseModel};
use crate::model::{self, SdModel};
use crate::probe::image::{ImageInputs, ImageSettings};
use crate::probe::pair::Pair;
use crate::report::{self, ImageProbeReport, ImageProbeSection, InputRole};

use super::recorded;

/// Image works, generic controls and style controls read from the folders given.
pub struct ImageData {
    pub works: ImageSet,
    pub controls: Option<ImageSet>,
    pub style_controls: Option<ImageSet>,
}

impl ImageData {
    pub fn load(works: &Path, controls: Option<&Path>, style_controls: Option<&Path>) -> Result<Self> {
        Ok(ImageData {
            works: load_images(works, "works")?,
            controls: controls.map(|p| load_images(p, "controls")).transpose()?,
            style_controls: style_controls.map(|p| load_images(p, "style controls")).transpose()?,
        })
    }

    fn inputs(&self) -> ImageInputs<'_> {
        ImageInputs {
            works: &self.works,
            controls: self.controls.as_ref(),
            style_controls: self.style_controls.as_ref(),
        }
    }

    /// Every image and caption file, with its role, for the report's inputs.
    pub fn recorded_inputs(&self) -> Vec<report::InputFile> {
        let sets = [
            (InputRole::Work, Some(&self.works)),
            (InputRole::Control, self.controls.as_ref()),
            (InputRole::StyleControl, self.style_controls.as_ref()),
        ];
        let mut out = vec![];
        for (role, set) in sets {
            for (path, digest) in set.map(ImageSet::files).unwrap_or_default() {
                let role = if path.extension().is_some_and(|e| e == "txt") { InputRole::Caption } else { role };
                out.push(recorded(role, path, digest));
            }
        }
        out
    }
}

/// Whether `works` names image works (a folder holding images) rather than texts.
pub fn works_are_images(works: &Path) -> bool {
    works.is_dir() && holds_images(works)
}

/// An image base with image works, or a clear error naming the base when they do not go
/// together.
pub fn check_base_for_images(base: &BaseModel) -> Result<()> {
    if model::is_sd_base(base) {
        Ok(())
    } else {
        Err(Error::input(
            &base.path,
            "the works are images but the base is not a Stable Diffusion 1.x/2.x model (a diffusers pipeline \
             directory or a single-file checkpoint); image works need an image base",
        ))
    }
}

/// `probe` on an image base: the spectrum report plus the image probe.
pub fn probe_images(
    adapter: &Adapter,
    base: &BaseModel,
    tokenizer: Option<&Path>,
    spectrum: report::SpectrumReport,
    data: &ImageData,
    settings: &ImageSettings,
    progress: &dyn crate::probe::Progress,
) -> Result<ImageProbeReport> {
    crate::error::injected_fault("probe")?;
    check_base_for_images(base)?;
    settings.check(None)?;
    let sd = SdModel::load(base, tokenizer, &candle_core::Device::Cpu)?;
    progress.stage("merge", 1);
    let (merged, merge) = sd.merged(adapter)?;
    let result =
        crate::probe::image::run(Pair { base: &sd, merged: &merged }, adapter, &data.inputs(), settings, progress)?;
    base.check_unchanged()?;
    let mut spectrum = spectrum;
    spectrum.inspect.inputs.extend(data.recorded_inputs());
    // What `--tokenizer` named (and the pipeline configs beside it), as parsed.
    spectrum.inspect.inputs.extend(sd.input_files().iter().map(|(p, d)| recorded(InputRole::Tokenizer, p, d)));
    let r = ImageProbeReport { spectrum, probe: ImageProbeSection { merge, result } };
    report::check_finite("probe", &r)?;
    Ok(r)
}
