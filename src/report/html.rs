//! report.html: one self-contained file (inline CSS and SVG, no scripts, no external assets)
//! that a non-engineer can read. The page is written with maud's `html!` templates
//! (https://maud.lambda.xyz): the markup is checked when the crate compiles, and every value
//! spliced into it is escaped unless wrapped in `PreEscaped`. The only `PreEscaped` text is the
//! constant stylesheet, so every string that comes from an input file (metadata, tags, module
//! names, work texts, paths) reaches the page escaped, inside the SVG charts too.
//! `render_html` assembles the page from one function per section, in page order.

use std::fmt::Display;

use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::evidence::{Report, Stage};
use super::human;
use super::ProbeSection;
use crate::probe::{Verdict, WorkEvidence};
use crate::spectral::{LayerSummary, ModuleSpectrum};

/// Modules whose spectra are drawn: the most informative ones.
pub const PLOTTED_SPECTRA: usize = 8;

/// The whole page, ending in a newline.
pub fn render_html(r: &Report) -> String {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "lorascope report: " (r.inputs[0].path) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { "LoRA adapter report" }
                p.mono { (r.inputs[0].path) }
                (summary(r))
                (adapter(r))
                (input_files(r))
                (information(r))
                (spectra(r))
                (works(r))
                @if let Some(section) = &r.probe {
                    (probe_section(section))
                }
                @if let Some(section) = &r.image_probe {
                    (super::html_image::image_section(section))
                }
                (method_and_warnings(r))
                (stages(r))
            }
        }
    };
    // Bidi overrides and other hidden controls from input strings would reorder or hide what a
    // reader sees (a U+202E in a work id mirrors the verdict after it): shown as escapes. The
    // page's own text has none, and newlines in it are only layout.
    crate::shown::lines(&page.into_string()) + "\n"
}

/// The probe stage's record: whether the probe ran and, if not, why.
fn probe_stage(r: &Report) -> Option<&Stage> {
    r.stages.iter().find(|s| s.name == super::StageName::Probe)
}

/// The coordinates of the SVG charts are written with one decimal.
pub(super) fn d1(x: f64) -> String {
    format!("{x:.1}")
}

/// A missing value shows as a dash.
pub(super) fn or_dash(x: Option<impl Display>) -> String {
    x.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The heading row of a table.
pub(super) fn header_row(columns: &[&str]) -> Markup {
    html! { tr { @for c in columns { th { (c) } } } }
}

/// A two-column table of labelled values.
fn kv(rows: &[(&str, String)]) -> Markup {
    html! { table.kv { @for (k, v) in rows { tr { th { (k) } td { (v) } } } } }
}

/// The summary in plain words: what the file is, how much it could hold, and what the probe found.
fn summary(r: &Report) -> Markup {
    let (a, t) = (&r.adapter, &r.spectrum.totals);
    html! {
        div.summary {
            p {
                "This file is a " b { (a.format) } " adapter for " b { (a.architecture) } " with "
                (a.modules.len()) " modules and " (human(a.params as f64)) " stored values. "
                "At most it can hold about "
                b { (human(t.capacity_bits)) " bits (" (human(t.capacity_bits / 8.0)) " bytes)" }
                " of information"
                @if let (Some(n), Some(per)) = (t.train_images, t.capacity_bits_per_image) {
                    ", about " (human(per / 8.0)) " bytes for each of the " (n) " training images its metadata reports"
                }
                ". That is an upper bound on what it could store, not a finding that it stores any particular work."
            }
            p { (verdict(r)) }
        }
    }
}

/// The summary's second sentence: how many works can be reconstructed, or why nobody looked.
fn verdict(r: &Report) -> Markup {
    if let Some(section) = &r.image_probe {
        let works = &section.result.works;
        let flagged: Vec<&str> = works.iter().filter(|w| w.verdict.is_copy()).map(|w| w.id.as_str()).collect();
        let style = works.iter().filter(|w| w.verdict == crate::probe::image::ImageVerdict::StyleOnly).count();
        return html! {
            "The merged model was probed on " (works.len()) " images: "
            @if flagged.is_empty() {
                b { "none is given back as a copy" }
            } @else {
                b {
                    (flagged.len())
                    (if flagged.len() == 1 { " is given back as a copy" } else { " are given back as copies" })
                }
                " (" (flagged.join(", ")) ")"
            }
            @if style > 0 { "; for " (style) " the adapter learned the style, with no sign of storing the image" }
            " (details below)."
        };
    }
    match (probe_stage(r), &r.probe) {
        (Some(stage), Some(section)) if stage.ran => {
            let works = &section.result.works;
            let flagged: Vec<&str> =
                works.iter().filter(|w| w.verdict == Verdict::ReconstructableCopy).map(|w| w.id.as_str()).collect();
            html! {
                "The merged model was probed on " (works.len()) " works: "
                @if flagged.is_empty() {
                    b { "none can be reconstructed" } " from it (details below)."
                } @else {
                    b { (flagged.len()) " can be reconstructed from it" } " (" (flagged.join(", ")) "); details below."
                }
            }
        }
        (Some(stage), _) => html! { b { "Copying was not assessed:" } " " (stage.reason) "." },
        (None, _) => html! {},
    }
}

/// The adapter, its base model and what its metadata says about training.
fn adapter(r: &Report) -> Markup {
    let training = &r.adapter.metadata.training;
    html! {
        h2 { "The adapter" }
        (kv(&adapter_rows(r)))
        @if !training.dataset_dirs.is_empty() {
            p { "Training folders (from the file's metadata):" }
            table {
                (header_row(&["folder", "images", "repeats"]))
                @for d in &training.dataset_dirs {
                    tr { td { (d.name) } td { (or_dash(d.images)) } td { (or_dash(d.repeats)) } }
                }
            }
        }
        @if !training.tags.is_empty() {
            p { "Caption tags used in training, most frequent first:" }
            // A tag is one unbroken word from the file, of any length: it may break anywhere.
            p.tags {
                @for (i, t) in training.tags.iter().take(40).enumerate() {
                    @if i > 0 { ", " }
                    (t.tag) " " span.muted { "(" (t.count) ")" }
                }
            }
        }
    }
}

/// The adapter's table: format, base model, model hashes, training metadata.
fn adapter_rows(r: &Report) -> Vec<(&'static str, String)> {
    let a = &r.adapter;
    let mut rows = vec![("format", a.format.clone()), ("architecture (guess)", a.architecture.clone())];
    if let Some(b) = &r.base {
        rows.push(("base model", format!("{} ({} parameters)", b.path, human(b.params as f64))));
        rows.push(("base weights changed", format!("{} parameters' worth of weights", human(b.touched_params as f64))));
    }
    rows.extend(hash_rows(r));
    let tr = &a.metadata.training;
    let opt = |x: &Option<String>| x.clone();
    let metadata = [
        ("trained from (metadata)", opt(&tr.base_model)),
        ("base model version", opt(&tr.base_model_version)),
        ("output name", opt(&tr.output_name)),
        ("training images", super::inspect::images_line(tr)),
        ("epochs", tr.num_epochs.map(|x| x.to_string())),
        ("training steps", tr.max_train_steps.map(|x| x.to_string())),
        ("resolution", opt(&tr.resolution)),
        ("task type", opt(&tr.task_type)),
        ("trigger phrase", opt(&tr.trigger_phrase)),
        ("training comment", opt(&tr.training_comment)),
        ("optimizer", opt(&tr.optimizer)),
        ("learning rates", super::inspect::learning_rates(tr)),
        ("seed", opt(&tr.seed)),
        ("training started", opt(&tr.started_at)),
        ("training finished", opt(&tr.finished_at)),
        ("network args", opt(&tr.network_args)),
        ("clip skip", opt(&tr.clip_skip)),
        ("noise offset", opt(&tr.noise_offset)),
        ("base model hash (metadata)", super::inspect::base_hashes(tr)),
    ];
    rows.extend(metadata.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
    rows
}

/// The model hashes that sites such as Civitai index, and whether the recorded training hash holds.
fn hash_rows(r: &Report) -> Vec<(&'static str, String)> {
    let h = &r.adapter.hashes;
    let mut rows = vec![("AutoV2 (Civitai)", h.autov2.clone())];
    if let Some(v) = &h.autov1 {
        rows.push(("AutoV1", v.clone()));
    }
    if let Some(c) = &h.sshs_model_hash {
        let verdict = if c.matches {
            "matches the tensors"
        } else {
            "DOES NOT match the tensors (changed after training, or forged)"
        };
        rows.push(("recorded training hash", format!("{} — {verdict}", c.recorded)));
    }
    if let Some(c) = &h.sshs_legacy_hash {
        rows.push(("recorded legacy hash", format!("{} — {}", c.recorded, super::inspect::legacy_verdict(c))));
    }
    rows
}

/// Every input file with its SHA-256, so a third party can check they hold the same bytes.
fn input_files(r: &Report) -> Markup {
    html! {
        h3 { "Input files" }
        table {
            (header_row(&["role", "file", "bytes", "SHA-256"]))
            @for i in &r.inputs {
                tr { td { (i.role) } td.mono { (i.path) } td { (i.bytes) } td.mono { (i.sha256) } }
            }
        }
        p.muted { "Anyone holding the same files can check these hashes (" span.mono { "lorascope verify DIR" } ")." }
    }
}

/// The capacity bound and how it is spread over the layers.
fn information(r: &Report) -> Markup {
    let t = &r.spectrum.totals;
    let capacity = format!(
        "{} bits = {} bytes at {} bits per parameter",
        human(t.capacity_bits),
        human(t.capacity_bits / 8.0),
        t.bits_per_param
    );
    html! {
        h2 { "How much information it adds" }
        (kv(&[
            ("effective parameters", human(t.effective_params as f64)),
            ("capacity (upper bound)", capacity),
            ("modules analysed", format!("{} (not analysed: {})", t.modules_analysed, t.modules_not_analysed)),
        ]))
        p { (r.spectrum.statement) }
        h3 { "Information per layer" }
        (svg_layer_heatmap(&r.spectrum.layers))
    }
}

/// Spectra of the most informative modules, then every module's numbers.
fn spectra(r: &Report) -> Markup {
    let values: std::collections::BTreeMap<&str, &super::ValueStats> =
        r.adapter.modules.iter().map(|m| (m.base_key.as_str(), &m.values)).collect();
    let mut ranked: Vec<&ModuleSpectrum> =
        r.spectrum.modules.iter().filter(|m| !m.singular_values.is_empty()).collect();
    ranked.sort_by(|x, y| {
        y.capacity_bits.total_cmp(&x.capacity_bits).then_with(|| crate::order::natural_cmp(&x.base_key, &y.base_key))
    });
    ranked.truncate(PLOTTED_SPECTRA);
    html! {
        h3 { "Singular-value spectra of the " (ranked.len()) " most informative modules" }
        div.spectra {
            @for m in &ranked {
                figure {
                    (svg_spectrum(m))
                    figcaption.mono {
                        (m.base_key) " — " (m.kind) " · effective rank " (format!("{:.2}", m.effective_rank))
                        " · " (human(m.capacity_bits)) " bits"
                    }
                }
            }
        }
        h3 { "All modules" }
        table {
            (header_row(&MODULE_COLUMNS))
            @for m in &r.spectrum.modules {
                @let v = values.get(m.base_key.as_str());
                tr {
                    td.mono { (m.base_key) } td { (m.kind) } td { (m.rank) }
                    td { (format!("{:.4}", m.spectral)) } td { (format!("{:.4}", m.fro)) }
                    td { (format!("{:.2}", m.effective_rank)) } td { (or_dash(m.rank_99)) }
                    td { (or_dash(m.relative_fro.map(|x| format!("{x:.4}")))) } td { (human(m.capacity_bits)) }
                    td { (or_dash(v.map(|v| format!("{:.4}", v.max_abs)))) }
                    td { (or_dash(v.map(|v| format!("{:.4}", v.std)))) }
                }
            }
        }
    }
}

const MODULE_COLUMNS: [&str; 11] = [
    "base weight",
    "kind",
    "rank",
    "σ₁",
    "‖ΔW‖",
    "eff. rank",
    "rank 99%",
    "rel. size",
    "bits",
    "max |x| stored",
    "std stored",
];

/// The works and controls as supplied, whether or not the probe ran on them.
fn works(r: &Report) -> Markup {
    use super::InputRole as R;
    let images: Vec<&super::InputFile> = r
        .inputs
        .iter()
        .filter(|i| matches!(i.role, R::StyleControl) || (r.works.is_empty() && matches!(i.role, R::Work | R::Control)))
        .collect();
    html! {
        h2 { "The works" }
        @if r.works.is_empty() && !images.is_empty() {
            @if let Some(stage) = probe_stage(r).filter(|s| !s.ran) {
                p { b { "Not probed:" } " " (stage.reason) "." }
            }
            table {
                (header_row(&["file", "role", "bytes", "SHA-256"]))
                @for i in &images {
                    tr { td.mono { (i.path) } td { (i.role) } td { (i.bytes) } td.mono { (i.sha256) } }
                }
            }
        } @else if r.works.is_empty() {
            p { "No works were supplied." }
        } @else {
            @if let Some(stage) = probe_stage(r).filter(|s| !s.ran) {
                p { b { "Not probed:" } " " (stage.reason) "." }
            }
            table {
                (header_row(&["id", "role", "characters", "SHA-256 of the text", "opening"]))
                @for w in &r.works {
                    tr { td { (w.id) } td { (w.role) } td { (w.chars) } td.mono { (w.sha256) } td { (w.excerpt) } }
                }
            }
        }
    }
}

/// The probe's findings: counts, bars, verdict table and reasons, statistics, reproduced
/// passages beside the originals, notes.
fn probe_section(p: &ProbeSection) -> Markup {
    let r = &p.result;
    let all: Vec<&WorkEvidence> = r.works.iter().chain(&r.controls).collect();
    html! {
        h2 { "Is it a copy of these works?" }
        (probe_counts(p))
        (calibration_failures(p))
        (svg_work_bars(&all))
        (probe_table(p))
        p { "Why each verdict:" }
        ul { @for w in &all { li { b { (w.id) } ": " (w.verdict_reason) } } }
        @if let Some(a) = &r.auc {
            p {
                "Works versus controls: ROC-AUC " (format!("{:.3}", a.value)) " (95% bootstrap interval "
                (format!("{:.3}–{:.3}", a.ci_low, a.ci_high)) "; 1 = every work gains more than every control)."
            }
        }
        @if let Some(c) = &p.capacity_check {
            p {
                "Capacity check: the works account for " (format!("{:.0}", c.gain_bits_works)) " bits, "
                (format!("{:.1}", 100.0 * c.ratio)) "% of the adapter's "
                (format!("{:.0}", c.capacity_bits)) "-bit capacity."
            }
        }
        (passages(&r.works))
        @if !r.notes.is_empty() {
            ul { @for n in &r.notes { li { (n) } } }
        }
    }
}

/// How the probe was run and how many works fall under each verdict.
fn probe_counts(p: &ProbeSection) -> Markup {
    let r = &p.result;
    let count = |v: Verdict| r.works.iter().filter(|w| w.verdict == v).count();
    html! {
        p {
            "The adapter was merged into the base model (" (p.merge.merged.len()) " weights changed) "
            "and both models were run on every work. "
            "Of " (r.works.len()) " works, " b { (count(Verdict::ReconstructableCopy)) " reconstructable copies" } ", "
            (count(Verdict::PartialCopy)) " partial copies, "
            (count(Verdict::MemorizedTraces)) " with memorised traces only, "
            (count(Verdict::NoEvidence)) " with no evidence. "
            "A " i { "reconstructable copy" } " means the merged model, prompted with pieces of the work, "
            "gives back verbatim at least " (format!("{:.0}", 100.0 * r.thresholds.substantial))
            "% of it that the base model does not, in passages the base finds improbable, and more than it "
            "gives back of control texts never trained on (the column on the right: each work's evidence beside "
            "the controls')."
        }
    }
}

/// One row per work and control with the probe's measurements.
fn probe_table(p: &ProbeSection) -> Markup {
    let r = &p.result;
    html! {
        table {
            (header_row(&PROBE_COLUMNS))
            @for (role, set) in [("work", &r.works), ("control", &r.controls)] {
                @for w in set {
                    tr {
                        td { (w.id) } td { (role) } td { b { (w.verdict.as_str()) } }
                        td { (format!("{:.0} → {:.0}", w.bits_base, w.bits_merged)) }
                        td { (format!("{:.1}%", 100.0 * w.gain_fraction)) }
                        td { (format!("{:.1}%", 100.0 * w.coverage_attributable)) }
                        td { (w.longest_span_chars) " chars" }
                        td {
                            (format!("{}/{} of {} ({}/{})", w.e1_windows_merged, w.e2_windows_merged, w.windows,
                                w.e1_windows_base, w.e2_windows_base))
                        }
                        td { (or_dash(w.p_value.map(|p| format!("{p:.3}")))) }
                        td { (format!("{:.0}", w.evidence_bits)) " bits · p " (or_dash(w.copy_p_adjusted.map(|p| format!("{p:.3}"))))
                            br; (svg_copy_null(w, r)) }
                    }
                }
            }
        }
    }
}

const PROBE_COLUMNS: [&str; 10] = [
    "id",
    "role",
    "verdict",
    "bits base → merged",
    "gain",
    "reconstructed (adapter)",
    "longest verbatim",
    "extraction windows E1/E2 merged (base)",
    "p",
    "copy evidence vs controls",
];

/// The controls that met the copy rule when judged like a work: loud, at the top of the
/// probe's findings, because every copy verdict on a work rests on the controls being clean.
fn calibration_failures(p: &ProbeSection) -> Markup {
    let c = &p.result.copy_calibration;
    html! {
        @if !c.failures.is_empty() {
            div.alarm {
                b { "Calibration failure: " }
                (c.failures.len()) " control text(s) never trained on met the copy rule when judged against the \
                other controls (" (c.failures.join(", ")) "). Spans the base finds improbable are reproduced on \
                texts like these without training, so a copy verdict on a work with no more evidence than these \
                controls is not reliable."
            }
        }
    }
}

/// One work's copy statistic (a diamond) beside every control's (grey ticks), on one axis from
/// 0 to the largest value, with the copy threshold (the margin over the largest control) dashed:
/// a reader sees at once whether the work's reproduced spans stand out from texts never trained
/// on.
pub fn svg_copy_null(w: &WorkEvidence, r: &crate::probe::ProbeResult) -> Markup {
    let (width, height, pad) = (130.0, 24.0, 6.0);
    let null: Vec<f64> = r.controls.iter().filter(|c| c.extracted && c.id != w.id).map(|c| c.evidence_bits).collect();
    let threshold = r.thresholds.copy_margin * null.iter().copied().fold(0.0, f64::max);
    let top = null.iter().copied().chain([w.evidence_bits, threshold]).fold(1.0, f64::max) * 1.05;
    let x = |v: f64| pad + (width - 2.0 * pad) * v / top;
    let y = height / 2.0;
    let title = format!(
        "{}: {:.0} improbable bits; controls {} (largest {:.0}); copy threshold {:.0}",
        w.id,
        w.evidence_bits,
        null.len(),
        null.iter().copied().fold(0.0, f64::max),
        threshold
    );
    let colour = verdict_colour(w.verdict);
    let (wx, d) = (x(w.evidence_bits), 5.0);
    let body = html! {
        line x1=(pad) y1=(y) x2=(width - pad) y2=(y) stroke="#bbb" {}
        @for v in &null {
            line x1=(format!("{:.1}", x(*v))) y1=(y - 6.0) x2=(format!("{:.1}", x(*v))) y2=(y + 6.0)
                stroke="#888" stroke-opacity="0.6" {}
        }
        @if threshold > 0.0 {
            line x1=(format!("{:.1}", x(threshold))) y1="2" x2=(format!("{:.1}", x(threshold))) y2=(height - 2.0)
                stroke="#c00" stroke-dasharray="3,2" {}
        }
        polygon points=(format!("{:.1},{:.1} {:.1},{:.1} {:.1},{:.1} {:.1},{:.1}", wx, y - d, wx + d, y, wx, y + d, wx - d, y))
            fill=(colour) stroke="#222" stroke-width="0.8" {}
    };
    svg_chart("copynull", (width, height), &title, body)
}

/// For each copied work, the longest reproduced passage beside the original text.
fn passages(works: &[WorkEvidence]) -> Markup {
    let copied = works.iter().filter(|w| w.verdict.is_copy());
    html! {
        @for w in copied {
            @if let Some(ps) = &w.longest_passage {
                h3 { (w.id) ": longest reproduced passage (" (ps.chars) " characters, prompted by " (ps.source) ")" }
                table {
                    (header_row(&["generated by the merged model", "the original work"]))
                    tr { td { (ps.generated) } td { (ps.original) } }
                }
            }
        }
    }
}

/// What the numbers mean and what they cannot show, then the run's warnings.
fn method_and_warnings(r: &Report) -> Markup {
    html! {
        h2 { "Method and limits" }
        ul { @for item in METHOD { li { (item) } } }
        @if !r.warnings.is_empty() {
            h2 { "Warnings" }
            ul { @for w in &r.warnings { li { (w) } } }
        }
    }
}

/// Which stages ran and why, and the tool and command that wrote the page.
fn stages(r: &Report) -> Markup {
    html! {
        h2 { "What ran" }
        table {
            (header_row(&["stage", "ran", "why"]))
            @for s in &r.stages {
                tr { td { (s.name) } td { (if s.ran { "yes" } else { "no" }) } td { (s.reason) } }
            }
        }
        p.muted {
            (r.tool.name) " " (r.tool.version) " · report schema " (r.schema_version) " · command: "
            span.mono { (r.command_line.join(" ")) }
        }
    }
}

/// Bar chart of σᵢ/σ₁ with the cumulative energy as a line: one `<svg class="spectrum">`.
pub fn svg_spectrum(m: &ModuleSpectrum) -> Markup {
    let (w, h, pad) = (360.0, 140.0, 24.0);
    let s = &m.singular_values;
    let n = s.len().clamp(1, 64);
    let s1 = s.first().copied().filter(|x| *x > 0.0).unwrap_or(1.0);
    let total: f64 = s.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    let bw = (w - 2.0 * pad) / n as f64;
    // Bars as (x, height); the line's points at each bar's centre.
    let mut bars = Vec::with_capacity(n);
    let mut points = Vec::with_capacity(n);
    let mut acc = 0.0;
    for (i, v) in s.iter().take(n).enumerate() {
        let x = pad + i as f64 * bw;
        bars.push((x, (v / s1) * (h - 2.0 * pad)));
        acc += v * v;
        points.push(format!("{},{}", d1(x + bw * 0.4), d1(h - pad - (acc / total) * (h - 2.0 * pad))));
    }
    let body = html! {
        rect x="0" y="0" width=(w) height=(h) fill="#fafafa" stroke="#ccc" {}
        @for (x, bh) in bars {
            rect x=(d1(x)) y=(d1(h - pad - bh)) width=(d1((bw * 0.8).max(0.5))) height=(d1(bh)) fill="#4a78b5" {}
        }
        polyline points=(points.join(" ")) fill="none" stroke="#d2691e" stroke-width="1.5" {}
        text x=(pad) y="14" font-size="11" fill="#333" {
            "σᵢ/σ₁ (bars), cumulative energy (line); " (n) " of " (s.len()) " values"
        }
    };
    svg_chart("spectrum", (w, h), &format!("singular values of {}", m.base_key), body)
}

/// Per work: bits gained (left bar, scaled to the largest gain) and the share reproduced
/// verbatim by the merged model and not by the base (right bar, 0–100%).
pub fn svg_work_bars(works: &[&WorkEvidence]) -> Markup {
    let (row, label_w, bar_w) = (22.0, 180.0, 300.0);
    let h = 30.0 + row * works.len() as f64;
    let w = label_w + 2.0 * bar_w + 40.0;
    let max_gain = works.iter().map(|x| x.gain_bits.abs()).fold(1.0, f64::max);
    let (x1, x2) = (label_w, label_w + bar_w + 20.0);
    let body = html! {
        text x=(x1) y="14" font-size="11" fill="#333" {
            "bits the adapter supplies (max " (format!("{max_gain:.0}")) ")"
        }
        text x=(x2) y="14" font-size="11" fill="#333" { "reconstructed by merged, not base (0–100%)" }
        @for (i, e) in works.iter().enumerate() {
            @let y = 22.0 + row * i as f64;
            @let colour = verdict_colour(e.verdict);
            @let gain_w = (e.gain_bits.max(0.0) / max_gain) * bar_w;
            @let copied_w = e.coverage_attributable.clamp(0.0, 1.0) * bar_w;
            text x="4" y=(d1(y + 11.0)) font-size="11" fill="#222" { (e.id.chars().take(26).collect::<String>()) }
            rect x=(x1) y=(d1(y)) width=(bar_w) height="14" fill="#f0f0f0" {}
            rect x=(x1) y=(d1(y)) width=(d1(gain_w)) height="14" fill=(colour) {}
            rect x=(x2) y=(d1(y)) width=(bar_w) height="14" fill="#f0f0f0" {}
            rect x=(x2) y=(d1(y)) width=(d1(copied_w)) height="14" fill=(colour) {}
        }
    };
    svg_chart("works", (w, h), "bits gained and share reconstructed per work", body)
}

/// Red for a copy, through orange and ochre, to blue for no evidence.
fn verdict_colour(v: Verdict) -> &'static str {
    match v {
        Verdict::ReconstructableCopy => "#b22222",
        Verdict::PartialCopy => "#d2691e",
        Verdict::MemorizedTraces => "#c9a227",
        Verdict::NoEvidence => "#4a78b5",
    }
}

/// One row per layer, colour by share of the adapter's capacity.
pub fn svg_layer_heatmap(layers: &[LayerSummary]) -> Markup {
    let row = 16.0;
    let (w, label) = (640.0, 360.0);
    let h = row * layers.len().max(1) as f64 + 8.0;
    let max = layers.iter().map(|l| l.capacity_bits).fold(0.0, f64::max).max(f64::MIN_POSITIVE);
    let body = html! {
        @for (i, l) in layers.iter().enumerate() {
            @let y = 4.0 + i as f64 * row;
            @let f = l.capacity_bits / max;
            // White to deep red.
            @let fill = format!("rgb({:.0},{:.0},{:.0})", 255.0 - 55.0 * f, 255.0 - 215.0 * f, 255.0 - 215.0 * f);
            text x="4" y=(d1(y + 12.0)) font-size="11" fill="#222" { (l.layer) }
            rect x=(label) y=(d1(y)) width=(d1(w - label - 90.0)) height=(d1(row - 2.0)) fill=(fill) stroke="#bbb" {}
            text x=(d1(w - 86.0)) y=(d1(y + 12.0)) font-size="11" fill="#222" { (human(l.capacity_bits)) " bits" }
        }
    };
    svg_chart("heatmap", (w, h), "information per layer", body)
}

/// The frame every chart shares: an inline SVG of the given size whose `<title>` names it for
/// screen readers; `class` is what the stylesheet and the tests select on. Shapes inside are
/// written `rect … {}`, with an end tag: maud writes `rect …;` as an HTML void tag without `/>`,
/// and inside inline SVG the HTML parser would then nest the next shape in it, unseen.
pub(super) fn svg_chart(class: &str, (w, h): (f64, f64), title: &str, body: Markup) -> Markup {
    html! {
        svg class=(class) xmlns="http://www.w3.org/2000/svg" width=(w) height=(h)
            viewBox=(format!("0 0 {w} {h}")) role="img" {
            title { (title) }
            (body)
        }
    }
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}\
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}\
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}\
th{background:#f4f4f4}table.kv th{width:14em}.summary{background:#f3f7fc;border-left:5px solid #4a78b5;padding:.8em 1.2em}\
.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;word-break:break-all}.muted{color:#666}\
.spectra{display:flex;flex-wrap:wrap;gap:12px}.spectra figure{margin:0}figcaption{font-size:.8em;max-width:360px;word-break:break-all}\
.alarm{background:#fdecea;border-left:5px solid #c00;padding:.8em 1.2em;margin:.8em 0}\
.tags,.kv td{overflow-wrap:anywhere}\
figure.generations{margin:.6em 0}figure.generations img{image-rendering:pixelated;margin-right:4px;border:2px solid #ddd}\
figure.generations img.merged{border-color:#b22222}";

const METHOD: &[&str] = &[
    "Every module's change to the base weights (ΔW) is analysed from the factors stored in the file, without forming the full matrix: its singular values say how large the change is and in how many independent directions it acts.",
    "Effective rank (Roy & Vetterli 2007) counts the directions that carry the change; the rank holding 99% of the energy sets the module's effective parameters, k·(m+n−k) for an m×n weight.",
    "Capacity = effective parameters × 3.6 bits (Morris et al. 2025 measured about 3.6 bits per parameter for GPT-style models). It bounds what the adapter could store; it does not show what it stores.",
    "Relative size compares ΔW with the base weight it changes; amplification (Hu et al. 2021, LoRA §7.3) says how strongly ΔW boosts directions the base barely uses; intruder dimensions (Shuttleworth et al. 2024) are new dominant directions absent from the base.",
    "Metadata (training tags, image counts, base model names) is what the file says about itself: it can be edited or removed. The recorded training hash, when present, is checked against the tensors.",
    "Whether specific works can be reconstructed from the model is established only by the merged-model probe (code length under base vs merged, extraction of near-verbatim continuations, calibrated membership scores). Style similarity alone is not evidence of copying.",
    "Bits gained: the code length of a work is the number of bits an arithmetic coder driven by the model needs for it (Delétang et al. 2024); the difference between base and merged model is what the adapter supplies. The base model is the reference, so what the base already knows (famous texts) is not attributed to the adapter.",
    "Extraction: at windows through each work the models are given a prefix and continue greedily (Carlini et al. 2022). Texts are compared after Unicode NFKC, lower-casing and whitespace collapsing; a window counts as E1 when the continuation equals the true text, E2 when it is at least 90% similar or shares a 50-character verbatim span. Every continuation is also searched for 50-character spans of any supplied work (Aerni et al. 2024).",
    "Verdicts follow the legal notion of memorisation (Cooper & Grimmelmann): a near-exact copy of a substantial portion that can be reconstructed from the model. Greedy decoding tests one continuation per prompt; sampling could reproduce more, so a no-evidence verdict is not proof of absence.",
    "p-values compare each work's gain per token with control works known not to be in training; with n controls the smallest possible p-value is 1/(n+1). Holm's correction is applied for per-work claims, Benjamini–Hochberg for screening.",
];
