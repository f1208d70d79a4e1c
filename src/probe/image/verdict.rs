//! Calibration and verdicts of the image probe (docs/probe.md, "Image verdicts"). The gain is
//! calibrated against the generic controls as the text probe calibrates its gain: empirical
//! p-values, Holm across the works, Benjamini–Hochberg for screening, AUC with a bootstrap
//! interval, the A/A check; and, because one owner's works can be significant as a set where
//! no single work is, one-sided Mann–Whitney tests of works vs controls, style controls vs
//! controls and works vs style controls. Every image is judged by one rule, in this order:
//! 1. `reconstructable-copy`: a merged generation within the near-copy distance (tiled ℓ2,
//!    Carlini et al. 2023: 0.15) and no base generation within it;
//! 2. `partial-copy`: the closest merged generation has the image's structure (SSIM ≥
//!    `partial_ssim` and a pHash distance ≤ `partial_phash` bits) and the base's closest has not;
//! 3. `memorized-traces`: the gain is significant against the controls (Holm ≤ α) and above
//!    every style control's when style controls are given;
//! 4. `style-only` (works only): works and style controls both gain more than the controls as
//!    sets (U test ≤ α, median gain above 0), the works not more than the style controls, and this work's gain not
//!    above theirs — the adapter learned the artist's style, with no sign that it stores these
//!    particular images;
//! 5. `no-evidence`.
//!
//! Controls are judged by the copy rules (a generation near an image never trained on means the
//! rule finds copies where there are none); a control that gets one is a calibration failure and
//! is listed. They are not judged for traces: rank p-values call the largest of n controls
//! significant against the other n − 1 as soon as n ≥ m/α, so a leave-one-out traces check would
//! flag the top controls of every well-powered run (their leave-one-out p-values are reported).

use super::super::calibrate::{
    aa_check, auc_with_interval, benjamini_hochberg, empirical_p, holm, mann_whitney, SetTest,
};
use super::super::verdict::controls_needed;
use super::{Closest, ImageCalibration, ImageEvidence, ImageRole, ImageSettings, ImageVerdict};

/// What the sets say, for the per-image rule.
struct SetFindings {
    /// Works and style controls both above the controls, works not above style controls.
    style_learned: bool,
    max_style_gain: Option<f64>,
}

pub(crate) fn decide(
    works: &mut [ImageEvidence],
    controls: &mut [ImageEvidence],
    style: &mut [ImageEvidence],
    generated: bool,
    s: &ImageSettings,
    notes: &mut Vec<String>,
) -> ImageCalibration {
    let gains = |v: &[ImageEvidence]| v.iter().map(|e| e.gain).collect::<Vec<f64>>();
    let (wg, cg, sg) = (gains(works), gains(controls), gains(style));
    let alpha = s.significance;
    if !cg.is_empty() {
        let p: Vec<f64> = wg.iter().map(|&g| empirical_p(g, &cg)).collect();
        let (h, q) = (holm(&p), benjamini_hochberg(&p));
        for (i, w) in works.iter_mut().enumerate() {
            (w.p_value, w.p_adjusted, w.q_value) = (Some(p[i]), Some(h[i]), Some(q[i]));
        }
        let m = works.len().max(1) as f64;
        for i in 0..controls.len() {
            let others: Vec<f64> = cg.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, g)| *g).collect();
            if !others.is_empty() {
                let p = empirical_p(cg[i], &others);
                (controls[i].p_value, controls[i].p_adjusted) = (Some(p), Some((p * m).min(1.0)));
            }
        }
    }
    let max_style_gain = sg.iter().copied().reduce(f64::max);
    for w in works.iter_mut() {
        w.above_style_controls = max_style_gain.map(|m| w.gain > m);
    }
    if !cg.is_empty() {
        for e in style.iter_mut() {
            e.p_value = Some(empirical_p(e.gain, &cg));
        }
    }
    let (wc, sc, ws) = (mann_whitney(&wg, &cg), mann_whitney(&sg, &cg), mann_whitney(&wg, &sg));
    let below = |t: &Option<SetTest>| t.as_ref().is_some_and(|t| t.p_value <= alpha);
    // Both sets must also gain in earnest (median above 0): an adapter that makes every image
    // worse, controls most, ranks the works "above" the controls without teaching anything.
    let learned = |g: &[f64]| median(g).is_some_and(|m| m > 0.0);
    let style_learned = below(&wc) && below(&sc) && !below(&ws) && learned(&wg) && learned(&sg);
    let findings = SetFindings { style_learned, max_style_gain };
    for w in works.iter_mut() {
        judge(w, generated, &findings, s);
    }
    let mut failures = vec![];
    for e in style.iter_mut() {
        judge_control(e, generated, s);
    }
    for c in controls.iter_mut() {
        judge_control(c, generated, s);
        if c.verdict != ImageVerdict::NoEvidence {
            failures.push(c.id.clone());
        }
    }
    power_notes(works.len(), cg.len(), sg.len(), &failures, s, notes);
    ImageCalibration {
        statistic: "denoising gain (loss under base − under merged) / under base".into(),
        controls: cg.len(),
        style_controls: sg.len(),
        smallest_p: 1.0 / (cg.len() + 1) as f64,
        aa_check: aa_check(&cg),
        auc: auc_with_interval(&wg, &cg, 1000, 0x10ca),
        works_vs_controls: wc,
        style_vs_controls: sc,
        works_vs_style: ws,
        failures,
    }
}

fn judge(e: &mut ImageEvidence, generated: bool, f: &SetFindings, s: &ImageSettings) {
    let (verdict, reason) = if let Some(r) = generated.then(|| copy_reason(e, s)).flatten() {
        r
    } else if let Some(r) = traces_reason(e, f, s) {
        (ImageVerdict::MemorizedTraces, r)
    } else if e.role == ImageRole::Work && f.style_learned && e.above_style_controls == Some(false) {
        (
            ImageVerdict::StyleOnly,
            format!(
                "works and style controls both gain more than the generic controls, the works no more than the style \
                 controls, and this work's gain {:.4} is not above the largest style control's {:.4}: the adapter \
                 learned the style, with no evidence that it stores this image",
                e.gain,
                f.max_style_gain.unwrap_or(0.0)
            ),
        )
    } else {
        (ImageVerdict::NoEvidence, no_evidence_reason(e, generated, s))
    };
    e.verdict = verdict;
    e.verdict_reason = reason;
}

fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(s[n / 2]),
        _ => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}

fn judge_control(c: &mut ImageEvidence, generated: bool, s: &ImageSettings) {
    (c.verdict, c.verdict_reason) = match generated.then(|| copy_reason(c, s)).flatten() {
        Some(r) => r,
        None => (ImageVerdict::NoEvidence, no_evidence_reason(c, generated, s)),
    };
    if c.role == ImageRole::StyleControl && c.verdict == ImageVerdict::NoEvidence {
        c.verdict_reason = format!(
            "a style control (a reference, not judged for traces): gain {:.4}, p against the controls {}",
            c.gain,
            c.p_value.map_or("-".into(), |p| format!("{p:.4}"))
        );
    }
}

fn closest_text(c: &Option<Closest>) -> String {
    c.as_ref().map_or("none".into(), |c| format!("{:.3} (generation {})", c.similarity.tiled_l2, c.generation))
}

fn copy_reason(e: &ImageEvidence, s: &ImageSettings) -> Option<(ImageVerdict, String)> {
    let (m, b) = (e.closest_merged.as_ref()?, e.closest_base.as_ref());
    let near = s.copy_distance;
    let base_near = b.is_some_and(|b| b.similarity.tiled_l2 <= near);
    if m.similarity.tiled_l2 <= near && !base_near {
        return Some((
            ImageVerdict::ReconstructableCopy,
            format!(
                "merged generation {} is within tiled ℓ2 {:.3} ≤ {near} of this image (Carlini et al.'s near-copy \
                 threshold; SSIM {:.3}, pHash distance {} bits); the base's closest is {}",
                m.generation,
                m.similarity.tiled_l2,
                m.similarity.ssim,
                m.similarity.phash_bits,
                closest_text(&e.closest_base)
            ),
        ));
    }
    let structural = |x: &Closest| x.similarity.ssim >= s.partial_ssim && x.similarity.phash_bits <= s.partial_phash;
    if structural(m) && !b.is_some_and(structural) {
        return Some((
            ImageVerdict::PartialCopy,
            format!(
                "merged generation {} has this image's structure: SSIM {:.3} ≥ {} and pHash distance {} ≤ {} bits \
                 (tiled ℓ2 {:.3}, above the near-copy {near}); the base's closest does not ({})",
                m.generation,
                m.similarity.ssim,
                s.partial_ssim,
                m.similarity.phash_bits,
                s.partial_phash,
                m.similarity.tiled_l2,
                b.map_or("none".into(), |b| format!(
                    "SSIM {:.3}, pHash {} bits",
                    b.similarity.ssim, b.similarity.phash_bits
                ))
            ),
        ));
    }
    None
}

fn traces_reason(e: &ImageEvidence, f: &SetFindings, s: &ImageSettings) -> Option<String> {
    let adj = e.p_adjusted?;
    if adj > s.significance || e.above_style_controls == Some(false) {
        return None;
    }
    let style = match f.max_style_gain {
        Some(m) => format!(", above every style control (largest {m:.4})"),
        None => ". No --style-controls were given, so learning the artist's style cannot be told apart from \
                  memorising this image"
            .to_string(),
    };
    Some(format!(
        "gain {:.4} (loss {:.5} → {:.5}) is significant against the controls: p {:.4}, Holm-adjusted {:.4} ≤ {}{style}",
        e.gain,
        e.loss_base,
        e.loss_merged,
        e.p_value.unwrap_or(1.0),
        adj,
        s.significance
    ))
}

fn no_evidence_reason(e: &ImageEvidence, generated: bool, s: &ImageSettings) -> String {
    let mut parts = vec![format!("gain {:.4}", e.gain)];
    match e.p_adjusted {
        Some(p) => parts.push(format!("Holm-adjusted p {p:.4} (level {})", s.significance)),
        None => parts.push("uncalibrated (no controls)".into()),
    }
    if e.above_style_controls == Some(false) {
        parts.push("not above the style controls".into());
    }
    if generated {
        parts.push(format!("closest merged generation {}", closest_text(&e.closest_merged)));
    }
    parts.join("; ")
}

fn power_notes(
    works: usize,
    controls: usize,
    style: usize,
    failures: &[String],
    s: &ImageSettings,
    notes: &mut Vec<String>,
) {
    if controls == 0 {
        notes.push(
            "no --controls: the gains are reported uncalibrated; give images of other artists (same kind and size) \
             that were not in training"
                .into(),
        );
    } else if works as f64 / (controls + 1) as f64 > s.significance {
        notes.push(format!(
            "with {controls} controls the smallest Holm-adjusted p-value {works} work(s) can reach is {:.3}, not \
             below {}: give at least {} controls for per-image `memorized-traces`; the set-level test still applies",
            (works as f64 / (controls + 1) as f64).min(1.0),
            s.significance,
            controls_needed(works, s.significance)
        ));
    }
    if style == 0 {
        notes.push(
            "no --style-controls: `style-only` cannot be decided; give the same artist's images that cannot have \
             been trained on (e.g. made after the adapter's ss_training_finished_at)"
                .into(),
        );
    }
    if !failures.is_empty() {
        notes.push(format!(
            "calibration failure: control(s) {} got a verdict when judged like a work; treat every verdict with caution",
            failures.join(", ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::image::{CaptionSource, Similarity};

    fn image(id: &str, role: ImageRole, gain: f64) -> ImageEvidence {
        ImageEvidence {
            id: id.into(),
            role,
            sha256: String::new(),
            width: 8,
            height: 8,
            caption: String::new(),
            caption_source: CaptionSource::Empty,
            loss_base: 1.0,
            loss_merged: 1.0 - gain,
            gain,
            loss_base_uncond: 1.0,
            loss_merged_uncond: 1.0,
            clid_base: 0.0,
            clid_merged: 0.0,
            wen_base: 0.0,
            wen_merged: 0.0,
            per_timestep: vec![],
            p_value: None,
            p_adjusted: None,
            q_value: None,
            above_style_controls: None,
            closest_merged: None,
            closest_base: None,
            verdict: ImageVerdict::NoEvidence,
            verdict_reason: String::new(),
        }
    }

    fn set(prefix: &str, role: ImageRole, gains: &[f64]) -> Vec<ImageEvidence> {
        gains.iter().enumerate().map(|(i, &g)| image(&format!("{prefix}{i}"), role, g)).collect()
    }

    /// 100 controls with gains 0.000..0.099 (p floor 1/101, Holm for 2 works 2/101 < 0.05).
    fn controls() -> Vec<ImageEvidence> {
        set("c", ImageRole::Control, &(0..100).map(|i| i as f64 / 1000.0).collect::<Vec<_>>())
    }

    #[test]
    fn works_above_every_control_and_style_control_are_traces() {
        let mut works = set("w", ImageRole::Work, &[0.5, 0.05]);
        let mut c = controls();
        let mut style = set("s", ImageRole::StyleControl, &[0.2, 0.1, 0.15]);
        let mut notes = vec![];
        let cal = decide(&mut works, &mut c, &mut style, false, &ImageSettings::default(), &mut notes);
        // 0.5 is above all 100 controls: p = 1/101, Holm × 2.
        assert_eq!(works[0].p_value, Some(1.0 / 101.0));
        assert_eq!(works[0].p_adjusted, Some(2.0 / 101.0));
        assert_eq!(works[0].verdict, ImageVerdict::MemorizedTraces, "{}", works[0].verdict_reason);
        // 0.05 is above 50 of the controls: p = 51/101.
        assert_eq!(works[1].p_value, Some(51.0 / 101.0));
        assert_eq!(works[1].verdict, ImageVerdict::NoEvidence);
        assert!(c.iter().all(|c| c.verdict == ImageVerdict::NoEvidence) && cal.failures.is_empty());
        assert_eq!(cal.smallest_p, 1.0 / 101.0);
    }

    #[test]
    fn works_that_gain_like_style_controls_are_style_only() {
        let mut works = set("w", ImageRole::Work, &[0.30, 0.31, 0.29, 0.32]);
        let mut c = controls();
        let mut style = set("s", ImageRole::StyleControl, &[0.33, 0.28, 0.30, 0.31, 0.34]);
        let mut notes = vec![];
        let cal = decide(&mut works, &mut c, &mut style, false, &ImageSettings::default(), &mut notes);
        assert!(cal.works_vs_controls.as_ref().unwrap().p_value < 0.05);
        assert!(cal.style_vs_controls.as_ref().unwrap().p_value < 0.05);
        assert!(cal.works_vs_style.as_ref().unwrap().p_value > 0.05);
        // Each work is significant against the controls but not above the style controls.
        assert!(works.iter().all(|w| w.p_adjusted.unwrap() < 0.05));
        assert!(works.iter().all(|w| w.verdict == ImageVerdict::StyleOnly), "{:?}", works[0].verdict_reason);
    }

    #[test]
    fn a_merged_generation_within_the_threshold_is_a_copy_unless_the_base_makes_one_too() {
        let near = |d: f64, tiles: usize| {
            Some(Closest {
                generation: 0,
                similarity: Similarity {
                    rms: d,
                    tiled_l2: d,
                    best_tile: d,
                    ssim: 0.9,
                    phash_bits: 2,
                    tiles_within: tiles,
                },
            })
        };
        let s = ImageSettings::default();
        let f = SetFindings { style_learned: false, max_style_gain: None };
        let mut w = image("w", ImageRole::Work, 0.0);
        (w.closest_merged, w.closest_base) = (near(0.10, 16), near(0.40, 0));
        judge(&mut w, true, &f, &s);
        assert_eq!(w.verdict, ImageVerdict::ReconstructableCopy);
        (w.closest_merged, w.closest_base) = (near(0.10, 16), near(0.12, 16));
        judge(&mut w, true, &f, &s);
        assert_eq!(w.verdict, ImageVerdict::NoEvidence, "the base gives it back too: not the adapter's doing");
        // SSIM 0.9 and 2 bits of pHash: the structure, not the pixels.
        (w.closest_merged, w.closest_base) = (near(0.30, 5), None);
        judge(&mut w, true, &f, &s);
        assert_eq!(w.verdict, ImageVerdict::PartialCopy, "{}", w.verdict_reason);
        (w.closest_merged, w.closest_base) = (near(0.30, 5), near(0.40, 1));
        judge(&mut w, true, &f, &s);
        assert_eq!(w.verdict, ImageVerdict::NoEvidence, "the base's generation has the structure too");
    }

    #[test]
    fn a_control_given_back_by_the_merged_model_is_a_calibration_failure() {
        let mut works = set("w", ImageRole::Work, &[0.01]);
        let mut c = controls();
        // The strongest control is significant against the others by rank alone: not a failure.
        c[7].gain = 0.9;
        let mut notes = vec![];
        let cal = decide(&mut works, &mut c, &mut [], true, &ImageSettings::default(), &mut notes);
        assert_eq!(c[7].p_value, Some(0.01));
        assert!(cal.failures.is_empty());
        let sim = |d: f64| Similarity { rms: d, tiled_l2: d, best_tile: d, ssim: 0.9, phash_bits: 2, tiles_within: 16 };
        c[3].closest_merged = Some(Closest { generation: 1, similarity: sim(0.05) });
        c[3].closest_base = Some(Closest { generation: 0, similarity: sim(0.5) });
        let cal = decide(&mut works, &mut c, &mut [], true, &ImageSettings::default(), &mut notes);
        assert_eq!(cal.failures, vec!["c3".to_string()]);
        assert!(notes.iter().any(|n| n.contains("calibration failure")));
    }
}
