//! report.html: one self-contained file (inline CSS and SVG, no scripts, no external assets)
//! that a non-engineer can read. Every string that comes from an input file (metadata, names,
//! work texts) is escaped.

use super::evidence::Report;
use super::human;
use super::ProbeSection;
use crate::probe::{Verdict, WorkEvidence};
use crate::spectral::{LayerSummary, ModuleSpectrum};

/// HTML-escape text for element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Bar chart of σᵢ/σ₁ with the cumulative energy as a line: one `<svg class="spectrum">`.
pub fn svg_spectrum(m: &ModuleSpectrum) -> String {
    let (w, h, pad) = (360.0, 140.0, 24.0);
    let s = &m.singular_values;
    let n = s.len().clamp(1, 64);
    let s1 = s.first().copied().filter(|x| *x > 0.0).unwrap_or(1.0);
    let total: f64 = s.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    let bw = (w - 2.0 * pad) / n as f64;
    let mut out = format!(
        r#"<svg class="spectrum" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img"><title>{}</title>"#,
        esc(&format!("singular values of {}", m.base_key))
    );
    out += &format!(r##"<rect x="0" y="0" width="{w}" height="{h}" fill="#fafafa" stroke="#ccc"/>"##);
    let mut acc = 0.0;
    let mut line = String::new();
    for (i, v) in s.iter().take(n).enumerate() {
        let bh = (v / s1) * (h - 2.0 * pad);
        let x = pad + i as f64 * bw;
        out += &format!(
            r##"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="#4a78b5"/>"##,
            h - pad - bh,
            (bw * 0.8).max(0.5)
        );
        acc += v * v;
        let y = h - pad - (acc / total) * (h - 2.0 * pad);
        line += &format!("{:.1},{y:.1} ", x + bw * 0.4);
    }
    out += &format!(r##"<polyline points="{}" fill="none" stroke="#d2691e" stroke-width="1.5"/>"##, line.trim_end());
    out += &format!(
        r##"<text x="{pad}" y="14" font-size="11" fill="#333">σᵢ/σ₁ (bars), cumulative energy (line); {} of {} values</text></svg>"##,
        n,
        s.len()
    );
    out
}

/// Per work: bits gained (left bar, scaled to the largest gain) and the share reproduced
/// verbatim by the merged model and not by the base (right bar, 0–100%).
pub fn svg_work_bars(works: &[&WorkEvidence]) -> String {
    let (row, label_w, bar_w) = (22.0, 180.0, 300.0);
    let h = 30.0 + row * works.len() as f64;
    let w = label_w + 2.0 * bar_w + 40.0;
    let max_gain = works.iter().map(|x| x.gain_bits.abs()).fold(1.0, f64::max);
    let mut out = format!(
        r#"<svg class="works" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img"><title>bits gained and share reconstructed per work</title>"#
    );
    let x1 = label_w;
    let x2 = label_w + bar_w + 20.0;
    out += &format!(
        r##"<text x="{x1}" y="14" font-size="11" fill="#333">bits the adapter supplies (max {max_gain:.0})</text><text x="{x2}" y="14" font-size="11" fill="#333">reconstructed by merged, not base (0–100%)</text>"##
    );
    for (i, e) in works.iter().enumerate() {
        let y = 22.0 + row * i as f64;
        let colour = match e.verdict {
            Verdict::ReconstructableCopy => "#b22222",
            Verdict::PartialCopy => "#d2691e",
            Verdict::MemorizedTraces => "#c9a227",
            Verdict::NoEvidence => "#4a78b5",
        };
        let gw = (e.gain_bits.max(0.0) / max_gain) * bar_w;
        let cw = e.coverage_attributable.clamp(0.0, 1.0) * bar_w;
        let name: String = e.id.chars().take(26).collect();
        out += &format!(
            r##"<text x="4" y="{:.1}" font-size="11" fill="#222">{}</text><rect x="{x1}" y="{y:.1}" width="{bar_w}" height="14" fill="#f0f0f0"/><rect x="{x1}" y="{y:.1}" width="{gw:.1}" height="14" fill="{colour}"/><rect x="{x2}" y="{y:.1}" width="{bar_w}" height="14" fill="#f0f0f0"/><rect x="{x2}" y="{y:.1}" width="{cw:.1}" height="14" fill="{colour}"/>"##,
            y + 11.0,
            esc(&name)
        );
    }
    out + "</svg>"
}

/// The probe's findings: verdict table, bars, reproduced passages beside the originals.
fn probe_section(p: &ProbeSection) -> String {
    let r = &p.result;
    let mut h = String::from("<h2>Is it a copy of these works?</h2>");
    let count = |v: Verdict| r.works.iter().filter(|w| w.verdict == v).count();
    h += &format!(
        "<p>The adapter was merged into the base model ({} weights changed) and both models were run on every work. \
         Of {} works, <b>{} reconstructable copies</b>, {} partial copies, {} with memorised traces only, {} with no evidence. \
         A <i>reconstructable copy</i> means the merged model, prompted with pieces of the work, gives back verbatim \
         at least {:.0}% of it that the base model does not.</p>",
        p.merge.merged.len(),
        r.works.len(),
        count(Verdict::ReconstructableCopy),
        count(Verdict::PartialCopy),
        count(Verdict::MemorizedTraces),
        count(Verdict::NoEvidence),
        100.0 * r.thresholds.substantial
    );
    let all: Vec<&WorkEvidence> = r.works.iter().chain(&r.controls).collect();
    h += &svg_work_bars(&all);
    h += "<table><tr><th>id</th><th>role</th><th>verdict</th><th>bits base → merged</th><th>gain</th><th>reconstructed (adapter)</th><th>longest verbatim</th><th>extraction windows E1/E2 merged (base)</th><th>p</th></tr>";
    for (role, set) in [("work", &r.works), ("control", &r.controls)] {
        for w in set.iter() {
            h += &format!(
                "<tr><td>{}</td><td>{role}</td><td><b>{}</b></td><td>{:.0} → {:.0}</td><td>{:.1}%</td><td>{:.1}%</td><td>{} chars</td><td>{}/{} of {} ({}/{})</td><td>{}</td></tr>",
                esc(&w.id),
                w.verdict.as_str(),
                w.bits_base,
                w.bits_merged,
                100.0 * w.gain_fraction,
                100.0 * w.coverage_attributable,
                w.longest_span_chars,
                w.e1_windows_merged,
                w.e2_windows_merged,
                w.windows,
                w.e1_windows_base,
                w.e2_windows_base,
                w.p_value.map_or("-".into(), |p| format!("{p:.3}")),
            );
        }
    }
    h += "</table><p>Why each verdict:</p><ul>";
    for w in r.works.iter().chain(&r.controls) {
        h += &format!("<li><b>{}</b>: {}</li>", esc(&w.id), esc(&w.verdict_reason));
    }
    h += "</ul>";
    if let Some(a) = &r.auc {
        h += &format!(
            "<p>Works versus controls: ROC-AUC {:.3} (95% bootstrap interval {:.3}–{:.3}; 1 = every work gains more than every control).</p>",
            a.value, a.ci_low, a.ci_high
        );
    }
    if let Some(c) = &p.capacity_check {
        h += &format!(
            "<p>Capacity check: the works account for {:.0} bits, {:.1}% of the adapter's {:.0}-bit capacity.</p>",
            c.gain_bits_works,
            100.0 * c.ratio,
            c.capacity_bits
        );
    }
    for w in r.works.iter().filter(|w| matches!(w.verdict, Verdict::ReconstructableCopy | Verdict::PartialCopy)) {
        if let Some(ps) = &w.longest_passage {
            h += &format!(
                "<h3>{}: longest reproduced passage ({} characters, prompted by {})</h3><table><tr><th>generated by the merged model</th><th>the original work</th></tr><tr><td>{}</td><td>{}</td></tr></table>",
                esc(&w.id),
                ps.chars,
                esc(&ps.source),
                esc(&ps.generated),
                esc(&ps.original)
            );
        }
    }
    if !r.notes.is_empty() {
        h += "<ul>";
        for n in &r.notes {
            h += &format!("<li>{}</li>", esc(n));
        }
        h += "</ul>";
    }
    h
}

/// One row per layer, colour by share of the adapter's capacity.
pub fn svg_layer_heatmap(layers: &[LayerSummary]) -> String {
    let row = 16.0;
    let (w, label) = (640.0, 360.0);
    let h = row * layers.len().max(1) as f64 + 8.0;
    let max = layers.iter().map(|l| l.capacity_bits).fold(0.0, f64::max).max(f64::MIN_POSITIVE);
    let mut out = format!(
        r#"<svg class="heatmap" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img"><title>information per layer</title>"#
    );
    for (i, l) in layers.iter().enumerate() {
        let y = 4.0 + i as f64 * row;
        let f = l.capacity_bits / max;
        // White to deep red.
        let (r, g, b) = (255.0 - 55.0 * f, 255.0 - 215.0 * f, 255.0 - 215.0 * f);
        out += &format!(r##"<text x="4" y="{:.1}" font-size="11" fill="#222">{}</text>"##, y + 12.0, esc(&l.layer));
        out += &format!(
            r##"<rect x="{label}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="rgb({r:.0},{g:.0},{b:.0})" stroke="#bbb"/>"##,
            w - label - 90.0,
            row - 2.0
        );
        out += &format!(
            r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#222">{} bits</text>"##,
            w - 86.0,
            y + 12.0,
            human(l.capacity_bits)
        );
    }
    out + "</svg>"
}

fn kv(rows: &[(&str, String)]) -> String {
    let mut s = String::from("<table class=\"kv\">");
    for (k, v) in rows {
        s += &format!("<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    }
    s + "</table>"
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}\
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}\
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}\
th{background:#f4f4f4}table.kv th{width:14em}.summary{background:#f3f7fc;border-left:5px solid #4a78b5;padding:.8em 1.2em}\
.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;word-break:break-all}.muted{color:#666}\
.spectra{display:flex;flex-wrap:wrap;gap:12px}.spectra figure{margin:0}figcaption{font-size:.8em;max-width:360px;word-break:break-all}";

/// Modules whose spectra are drawn: the most informative ones.
pub const PLOTTED_SPECTRA: usize = 8;

pub fn render_html(r: &Report) -> String {
    let a = &r.adapter;
    let t = &r.spectrum.totals;
    let mut h = String::from("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    h += &format!("<title>lorascope report: {}</title><style>{STYLE}</style></head><body>", esc(&r.inputs[0].path));
    h += &format!("<h1>LoRA adapter report</h1><p class=\"mono\">{}</p>", esc(&r.inputs[0].path));

    // Summary in plain words.
    let probe = r.stages.iter().find(|s| s.name == super::StageName::Probe);
    let mut summary = format!(
        "This file is a <b>{}</b> adapter for <b>{}</b> with {} modules and {} stored values. ",
        esc(&a.format),
        esc(&a.architecture),
        a.modules.len(),
        human(a.params as f64)
    );
    summary += &format!(
        "At most it can hold about <b>{} bits ({} bytes)</b> of information",
        human(t.capacity_bits),
        human(t.capacity_bits / 8.0)
    );
    if let (Some(n), Some(per)) = (t.train_images, t.capacity_bits_per_image) {
        summary +=
            &format!(", about {} bytes for each of the {n} training images its metadata reports", human(per / 8.0));
    }
    summary += ". That is an upper bound on what it could store, not a finding that it stores any particular work.";
    let verdict = match (probe, &r.probe) {
        (Some(p), Some(section)) if p.ran => {
            let flagged: Vec<String> = section
                .result
                .works
                .iter()
                .filter(|w| w.verdict == Verdict::ReconstructableCopy)
                .map(|w| esc(&w.id))
                .collect();
            if flagged.is_empty() {
                format!(
                    "The merged model was probed on {} works: <b>none can be reconstructed</b> from it (details below).",
                    section.result.works.len()
                )
            } else {
                format!(
                    "The merged model was probed on {} works: <b>{} can be reconstructed from it</b> ({}); details below.",
                    section.result.works.len(),
                    flagged.len(),
                    flagged.join(", ")
                )
            }
        }
        (Some(p), _) => format!("<b>Copying was not assessed:</b> {}.", esc(&p.reason)),
        (None, _) => String::new(),
    };
    h += &format!("<div class=\"summary\"><p>{summary}</p><p>{verdict}</p></div>");

    // The adapter.
    h += "<h2>The adapter</h2>";
    let mut rows = vec![("format", a.format.clone()), ("architecture (guess)", a.architecture.clone())];
    if let Some(b) = &r.base {
        rows.push(("base model", format!("{} ({} parameters)", b.path, human(b.params as f64))));
        rows.push(("base weights changed", format!("{} parameters' worth of weights", human(b.touched_params as f64))));
    }
    rows.push(("AutoV2 (Civitai)", a.hashes.autov2.clone()));
    if let Some(v) = &a.hashes.autov1 {
        rows.push(("AutoV1", v.clone()));
    }
    if let Some(c) = &a.hashes.sshs_model_hash {
        rows.push((
            "recorded training hash",
            format!(
                "{} — {}",
                c.recorded,
                if c.matches {
                    "matches the tensors"
                } else {
                    "DOES NOT match the tensors (changed after training, or forged)"
                }
            ),
        ));
    }
    let tr = &a.metadata.training;
    let opt = |x: &Option<String>| x.clone();
    for (k, v) in [
        ("trained from (metadata)", opt(&tr.base_model)),
        ("base model version", opt(&tr.base_model_version)),
        ("output name", opt(&tr.output_name)),
        ("training images", tr.num_train_images.map(|x| x.to_string())),
        ("epochs", tr.num_epochs.map(|x| x.to_string())),
        ("training steps", tr.max_train_steps.map(|x| x.to_string())),
        ("resolution", opt(&tr.resolution)),
    ] {
        if let Some(v) = v {
            rows.push((k, v));
        }
    }
    h += &kv(&rows);
    if !tr.dataset_dirs.is_empty() {
        h += "<p>Training folders (from the file's metadata):</p><table><tr><th>folder</th><th>images</th><th>repeats</th></tr>";
        for d in &tr.dataset_dirs {
            let f = |x: Option<u64>| x.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
            h += &format!("<tr><td>{}</td><td>{}</td><td>{}</td></tr>", esc(&d.name), f(d.images), f(d.repeats));
        }
        h += "</table>";
    }
    if !tr.tags.is_empty() {
        h += "<p>Caption tags used in training, most frequent first:</p><p>";
        let tags: Vec<String> = tr
            .tags
            .iter()
            .take(40)
            .map(|t| format!("{} <span class=\"muted\">({})</span>", esc(&t.tag), t.count))
            .collect();
        h += &tags.join(", ");
        h += "</p>";
    }
    h += "<h3>Input files</h3><table><tr><th>role</th><th>file</th><th>bytes</th><th>SHA-256</th></tr>";
    for i in &r.inputs {
        h += &format!(
            "<tr><td>{}</td><td class=\"mono\">{}</td><td>{}</td><td class=\"mono\">{}</td></tr>",
            esc(i.role.as_str()),
            esc(&i.path),
            i.bytes,
            esc(&i.sha256)
        );
    }
    h += "</table><p class=\"muted\">Anyone holding the same files can check these hashes (<span class=\"mono\">lorascope verify DIR</span>).</p>";

    // Information.
    h += "<h2>How much information it adds</h2>";
    h += &kv(&[
        ("effective parameters", human(t.effective_params as f64)),
        (
            "capacity (upper bound)",
            format!(
                "{} bits = {} bytes at {} bits per parameter",
                human(t.capacity_bits),
                human(t.capacity_bits / 8.0),
                t.bits_per_param
            ),
        ),
        ("modules analysed", format!("{} (not analysed: {})", t.modules_analysed, t.modules_not_analysed)),
    ]);
    h += &format!("<p>{}</p>", esc(&r.spectrum.statement));
    h += "<h3>Information per layer</h3>";
    h += &svg_layer_heatmap(&r.spectrum.layers);
    let mut ranked: Vec<&ModuleSpectrum> =
        r.spectrum.modules.iter().filter(|m| !m.singular_values.is_empty()).collect();
    ranked.sort_by(|x, y| y.capacity_bits.total_cmp(&x.capacity_bits).then_with(|| x.base_key.cmp(&y.base_key)));
    h += &format!(
        "<h3>Singular-value spectra of the {} most informative modules</h3><div class=\"spectra\">",
        ranked.len().min(PLOTTED_SPECTRA)
    );
    for m in ranked.iter().take(PLOTTED_SPECTRA) {
        h += &format!(
            "<figure>{}<figcaption class=\"mono\">{} — {} · effective rank {:.2} · {} bits</figcaption></figure>",
            svg_spectrum(m),
            esc(&m.base_key),
            esc(m.kind.as_str()),
            m.effective_rank,
            human(m.capacity_bits)
        );
    }
    h += "</div><h3>All modules</h3><table><tr><th>base weight</th><th>kind</th><th>rank</th><th>σ₁</th><th>‖ΔW‖</th><th>eff. rank</th><th>rank 99%</th><th>rel. size</th><th>bits</th></tr>";
    for m in &r.spectrum.modules {
        h += &format!(
            "<tr><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.2}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&m.base_key),
            esc(m.kind.as_str()),
            m.rank,
            m.spectral,
            m.fro,
            m.effective_rank,
            m.rank_99.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
            m.relative_fro.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into()),
            human(m.capacity_bits)
        );
    }
    h += "</table>";

    // Works.
    h += "<h2>The works</h2>";
    if r.works.is_empty() {
        h += "<p>No works were supplied.</p>";
    } else {
        if let Some(p) = probe.filter(|p| !p.ran) {
            h += &format!("<p><b>Not probed:</b> {}.</p>", esc(&p.reason));
        }
        h += "<table><tr><th>id</th><th>role</th><th>characters</th><th>SHA-256 of the text</th><th>opening</th></tr>";
        for w in &r.works {
            h += &format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td>{}</td></tr>",
                esc(&w.id),
                esc(w.role.as_str()),
                w.chars,
                esc(&w.sha256),
                esc(&w.excerpt)
            );
        }
        h += "</table>";
    }

    if let Some(p) = &r.probe {
        h += &probe_section(p);
    }

    // Method and limits.
    h += "<h2>Method and limits</h2><ul>";
    for item in METHOD {
        h += &format!("<li>{}</li>", esc(item));
    }
    h += "</ul>";
    if !r.warnings.is_empty() {
        h += "<h2>Warnings</h2><ul>";
        for w in &r.warnings {
            h += &format!("<li>{}</li>", esc(w));
        }
        h += "</ul>";
    }
    h += "<h2>What ran</h2><table><tr><th>stage</th><th>ran</th><th>why</th></tr>";
    for s in &r.stages {
        h += &format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(s.name.as_str()),
            if s.ran { "yes" } else { "no" },
            esc(&s.reason)
        );
    }
    h += &format!(
        "</table><p class=\"muted\">{} {} · report schema {} · command: <span class=\"mono\">{}</span></p></body></html>\n",
        esc(&r.tool.name),
        esc(&r.tool.version),
        r.schema_version,
        esc(&r.command_line.join(" "))
    );
    h
}

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
