//! The image probe's part of report.html: counts by verdict, gain bars, the table of every
//! image with its scores, the reasons, the set-level tests, and each work beside the base's and
//! the merged model's generations (PNG data URIs: the page stays one self-contained file).

use maud::{html, Markup};

use super::html::{d1, header_row, or_dash, svg_chart};
use super::ImageProbeSection;
use crate::probe::calibrate::SetTest;
use crate::probe::image::{GenerationModel, ImageEvidence, ImageProbeResult, ImageVerdict};

pub(super) fn image_section(p: &ImageProbeSection) -> Markup {
    let r = &p.result;
    let all: Vec<&ImageEvidence> = r.works.iter().chain(&r.style_controls).chain(&r.controls).collect();
    html! {
        h2 { "Is it a copy of these images?" }
        (counts(p))
        @if !r.calibration.failures.is_empty() {
            div.alarm {
                b { "Calibration failure: " }
                (r.calibration.failures.len()) " control image(s) never trained on got a verdict when judged against \
                the other controls (" (r.calibration.failures.join(", ")) "). A verdict on a work with no more \
                evidence than these controls is not reliable."
            }
        }
        (svg_gain_bars(&all))
        (table(&all))
        p { "Why each verdict:" }
        ul { @for e in &all { li { b { (e.id) } " (" (e.role.as_str()) "): " (e.verdict_reason) } } }
        (sets(r))
        (gallery(r))
        p.muted {
            "What " i { "style-only" } " means: the adapter made the model better at this artist's images in \
            general (works and the artist's other images alike), more than at other artists' images. That is \
            evidence the adapter learned the style, typically from the artist's work; it is not evidence that \
            any particular image is stored in the adapter or can be reproduced from it."
        }
        @if !r.notes.is_empty() {
            ul { @for n in &r.notes { li { (n) } } }
        }
    }
}

fn counts(p: &ImageProbeSection) -> Markup {
    let r = &p.result;
    let count = |v: ImageVerdict| r.works.iter().filter(|w| w.verdict == v).count();
    let m = &r.model;
    html! {
        p {
            "The adapter was merged into the " (m.family) " base (" (p.merge.merged.len()) " weights changed) and "
            "both models denoised every image at timesteps " (format!("{:?}", r.settings.timesteps)) " with "
            (r.settings.draws) " identical noise draws each. "
            "Of " (r.works.len()) " works, " b { (count(ImageVerdict::ReconstructableCopy)) " reconstructable copies" }
            ", " (count(ImageVerdict::PartialCopy)) " partial copies, "
            (count(ImageVerdict::MemorizedTraces)) " with memorised traces, "
            (count(ImageVerdict::StyleOnly)) " style-only, "
            (count(ImageVerdict::NoEvidence)) " with no evidence. "
            @if r.generations.is_empty() {
                "No images were generated (" i { "--generate" } " not given), so copy verdicts were not possible."
            } @else {
                "A " i { "reconstructable copy" } " means an image the merged model generated from a caption is within "
                (r.settings.copy_distance) " (tiled ℓ2 on [0,1] pixels, Carlini et al. 2023) of the work and no "
                "image the base generated from the same caption and seed is."
            }
        }
    }
}

fn verdict_colour(v: ImageVerdict) -> &'static str {
    match v {
        ImageVerdict::ReconstructableCopy => "#b22222",
        ImageVerdict::PartialCopy => "#d2691e",
        ImageVerdict::MemorizedTraces => "#c9a227",
        ImageVerdict::StyleOnly => "#7a5ca8",
        ImageVerdict::NoEvidence => "#4a78b5",
    }
}

/// Per image: the denoising gain as a bar from a zero line (gains can be negative: the adapter
/// made the image harder to denoise), coloured by verdict.
fn svg_gain_bars(all: &[&ImageEvidence]) -> Markup {
    let (row, label_w, bar_w) = (22.0, 220.0, 420.0);
    let h = 30.0 + row * all.len() as f64;
    let w = label_w + bar_w + 80.0;
    let max = all.iter().map(|e| e.gain.abs()).fold(1e-9, f64::max);
    let zero = label_w + bar_w / 2.0;
    let body = html! {
        text x=(label_w) y="14" font-size="11" fill="#333" {
            "denoising gain (loss base − merged) / base; ±" (format!("{:.1}%", 100.0 * max)) " at the ends"
        }
        line x1=(d1(zero)) y1="18" x2=(d1(zero)) y2=(d1(h)) stroke="#999" {}
        @for (i, e) in all.iter().enumerate() {
            @let y = 22.0 + row * i as f64;
            @let len = e.gain / max * bar_w / 2.0;
            @let x = if len < 0.0 { zero + len } else { zero };
            text x="4" y=(d1(y + 11.0)) font-size="11" fill="#222" {
                (e.id.chars().take(22).collect::<String>()) " · " (e.role.as_str())
            }
            rect x=(d1(x)) y=(d1(y)) width=(d1(len.abs())) height="14" fill=(verdict_colour(e.verdict)) {}
        }
    };
    svg_chart("works", (w, h), "denoising gain per image", body)
}

const COLUMNS: [&str; 10] = [
    "image",
    "role",
    "verdict",
    "caption",
    "loss base → merged",
    "gain",
    "CLiD gap base → merged",
    "Wen magnitude base → merged",
    "p (Holm)",
    "closest generation merged / base",
];

fn table(all: &[&ImageEvidence]) -> Markup {
    let closest =
        |c: &Option<crate::probe::image::Closest>| c.as_ref().map(|c| format!("{:.3}", c.similarity.tiled_l2));
    html! {
        table {
            (header_row(&COLUMNS))
            @for e in all {
                tr {
                    td { (e.id) } td { (e.role.as_str()) } td { b { (e.verdict.as_str()) } }
                    td { (e.caption) br; span.muted { (e.caption_source.as_str()) } }
                    td { (format!("{:.5} → {:.5}", e.loss_base, e.loss_merged)) }
                    td { (format!("{:+.2}%", 100.0 * e.gain)) }
                    td { (format!("{:.5} → {:.5}", e.clid_base, e.clid_merged)) }
                    td { (format!("{:.3} → {:.3}", e.wen_base, e.wen_merged)) }
                    td {
                        (or_dash(e.p_value.map(|p| format!("{p:.3}"))))
                        " (" (or_dash(e.p_adjusted.map(|p| format!("{p:.3}")))) ")"
                    }
                    td { (or_dash(closest(&e.closest_merged))) " / " (or_dash(closest(&e.closest_base))) }
                }
            }
        }
    }
}

fn set_row(name: &str, t: &Option<SetTest>) -> Markup {
    html! {
        @if let Some(t) = t {
            tr {
                td { (name) } td { (format!("{:.1}", t.u)) } td { (format!("{:.3}", t.auc)) }
                td { (format!("{:.4}", t.p_value)) } td { (t.method.as_str()) } td { (t.works) " vs " (t.controls) }
            }
        }
    }
}

fn sets(r: &ImageProbeResult) -> Markup {
    let c = &r.calibration;
    html! {
        p {
            "Set-level tests (one-sided Mann–Whitney U on the gain): a set of one artist's works can stand out from \
            other artists' images where no single work does. Controls: " (c.controls) ", style controls: "
            (c.style_controls) "; the smallest per-image p-value the controls allow is "
            (format!("{:.3}", c.smallest_p)) "."
        }
        table {
            (header_row(&["test", "U", "AUC", "p", "method", "sizes"]))
            (set_row("works > controls", &c.works_vs_controls))
            (set_row("style controls > controls", &c.style_vs_controls))
            (set_row("works > style controls", &c.works_vs_style))
        }
    }
}

/// Each work beside the base's and the merged model's generations from its caption.
fn gallery(r: &ImageProbeResult) -> Markup {
    html! {
        @if !r.generations.is_empty() {
            h3 { "Generations from each work's caption" }
            p.muted { "Same seed, same caption: base on the left of each pair, merged on the right." }
            @for pic in &r.pictures {
                figure.generations {
                    figcaption { b { (pic.id) } }
                    img src=(format!("data:image/png;base64,{}", pic.png_base64)) alt=(format!("work {}", pic.id))
                        width="160" height="160";
                    @for g in r.generations.iter().filter(|g| g.caption_of == pic.id) {
                        img src=(format!("data:image/png;base64,{}", g.png_base64))
                            alt=(format!("{} generation, seed {}", g.model.as_str(), g.seed))
                            title=(format!("{} · seed {}", g.model.as_str(), g.seed))
                            width="160" height="160"
                            class=(if g.model == GenerationModel::Merged { "merged" } else { "base" });
                    }
                }
            }
        }
    }
}
