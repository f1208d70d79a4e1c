//! The image probe in the report: its JSON section and its terminal rendering (report.html's
//! part is in html.rs beside the text probe's).

use serde::{Deserialize, Serialize};

use super::{table, SpectrumReport};
use crate::model::MergeSummary;
use crate::probe::calibrate::SetTest;
use crate::probe::image::{ImageEvidence, ImageProbeResult};
use crate::shown::inline;

/// What the image probe found, with what merging changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageProbeSection {
    pub merge: MergeSummary,
    #[serde(flatten)]
    pub result: ImageProbeResult,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageProbeReport {
    #[serde(flatten)]
    pub spectrum: SpectrumReport,
    #[serde(flatten)]
    pub probe: ImageProbeSection,
}

const HEADER: [&str; 9] =
    ["image", "caption", "loss base → merged", "gain", "CLiD b → m", "Wen b → m", "closest gen", "p", "verdict"];

fn rows(es: &[ImageEvidence]) -> Vec<Vec<String>> {
    es.iter()
        .map(|e| {
            vec![
                e.id.clone(),
                e.caption_source.as_str().to_string(),
                format!("{:.5} → {:.5}", e.loss_base, e.loss_merged),
                format!("{:+.2}%", 100.0 * e.gain),
                format!("{:.4} → {:.4}", e.clid_base, e.clid_merged),
                format!("{:.2} → {:.2}", e.wen_base, e.wen_merged),
                e.closest_merged.as_ref().map_or("-".into(), |c| format!("{:.3}", c.similarity.tiled_l2)),
                e.p_value.map_or("-".into(), |p| format!("{p:.3}")),
                e.verdict.as_str().to_string(),
            ]
        })
        .collect()
}

fn set_line(name: &str, t: &Option<SetTest>) -> String {
    match t {
        Some(t) => format!(
            "{name}: U {:.1}, AUC {:.3}, one-sided p {:.4} ({}, {} vs {})\n",
            t.u,
            t.auc,
            t.p_value,
            t.method.as_str(),
            t.works,
            t.controls
        ),
        None => String::new(),
    }
}

pub fn render_image_probe(r: &ImageProbeReport) -> String {
    render_image_section(&r.probe, &r.spectrum.inspect.adapter.format)
}

pub(crate) fn render_image_section(r: &ImageProbeSection, format: &str) -> String {
    let p = &r.result;
    let m = &p.model;
    let mut out = format!(
        "adapter {format}  ({} modules merged, {} zero)\nmodel {} · {} · {} px · {} prediction · {} UNet passes\n\n",
        r.merge.merged.len(),
        r.merge.zero.len(),
        m.family,
        m.layout,
        m.resolution,
        m.prediction,
        p.unet_passes
    );
    out += &table(&HEADER, &rows(&p.works));
    for (name, set) in [("style controls", &p.style_controls), ("controls", &p.controls)] {
        if !set.is_empty() {
            out += &format!("\n{name}\n");
            out += &table(&HEADER, &rows(set));
        }
    }
    let c = &p.calibration;
    out += "\n";
    if let Some(a) = &c.auc {
        out +=
            &format!("AUC works vs controls (gain) {:.3}  [95% bootstrap {:.3}–{:.3}]\n", a.value, a.ci_low, a.ci_high);
    }
    out += &set_line("set test works > controls", &c.works_vs_controls);
    out += &set_line("set test style controls > controls", &c.style_vs_controls);
    out += &set_line("set test works > style controls", &c.works_vs_style);
    for e in p.works.iter().filter(|e| e.verdict != crate::probe::image::ImageVerdict::NoEvidence) {
        out += &format!("\n{} — {}: {}\n", inline(&e.id), e.verdict.as_str(), inline(&e.verdict_reason));
    }
    for n in &p.notes {
        out += &format!("\nnote: {}\n", inline(n));
    }
    let s = &p.settings;
    out += &format!(
        "\nsettings: timesteps {:?} × {} draws (noise seed {:#x}); generations {} seeds × {} DDIM steps, guidance {}; \
         near-copy tiled ℓ2 ≤ {}, partial SSIM ≥ {} and pHash ≤ {} bits; significance {} (Holm)\n",
        s.timesteps,
        s.draws,
        s.noise_seed,
        s.generate_seeds.len(),
        s.ddim_steps,
        s.guidance,
        s.copy_distance,
        s.partial_ssim,
        s.partial_phash,
        s.significance
    );
    out
}
