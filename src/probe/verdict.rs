//! The last phases: works calibrated against the controls on the gain in bits per token
//! (empirical p-values with Holm and Benjamini–Hochberg adjustments, ROC-AUC, notes on what the
//! controls cannot support), then a verdict for every work and control, every one calibrated on
//! the controls. The controls are the null for each statistic a verdict uses: the gain per token
//! (for `memorized-traces`) and the copy statistic (improbable reproduced bits, for
//! `partial-copy` and `reconstructable-copy`). A copy verdict needs an absolute floor (an
//! improbable span; a substantial portion for a reconstructable copy), significance against the
//! controls, and a margin over the largest control: rank-based p-values alone call the largest
//! of n controls significant against the other n − 1 as soon as n ≥ m/α, so without a margin
//! the leave-one-out check below would flag a control in every well-powered run. Controls are
//! judged by the same rule, each against the others; a control that still gets a copy verdict
//! is a calibration failure and is reported as one. Rules and sources: docs/probe.md.

use serde::{Deserialize, Serialize};

use super::calibrate::{self, empirical_p, holm, Auc};
use super::{Calibration, Thresholds, Verdict, WorkEvidence};

/// What the controls say about the works.
pub(crate) struct Calibrated {
    pub calibration: Option<Calibration>,
    pub auc: Option<Auc>,
    pub notes: Vec<String>,
}

/// Write each work's p-values (when there are controls) and measure how works and controls
/// separate.
pub(crate) fn calibrate(works: &mut [WorkEvidence], controls: &[WorkEvidence], th: &Thresholds) -> Calibrated {
    let control_stats: Vec<f64> = controls.iter().map(WorkEvidence::gain_per_token).collect();
    let mut notes = vec![];
    let calibration = if control_stats.is_empty() {
        notes.push(
            "no --controls: membership scores are reported uncalibrated, without p-values; give works of the same \
             author, kind, length and era known not to be in training"
                .to_string(),
        );
        None
    } else {
        Some(against_controls(works, &control_stats, th, &mut notes))
    };
    let work_stats: Vec<f64> = works.iter().map(WorkEvidence::gain_per_token).collect();
    let auc = calibrate::auc_with_interval(&work_stats, &control_stats, 1000, 0x10ca);
    Calibrated { calibration, auc, notes }
}

fn against_controls(
    works: &mut [WorkEvidence],
    control_stats: &[f64],
    th: &Thresholds,
    notes: &mut Vec<String>,
) -> Calibration {
    let p: Vec<f64> = works.iter().map(|w| calibrate::empirical_p(w.gain_per_token(), control_stats)).collect();
    let holm = calibrate::holm(&p);
    let bh = calibrate::benjamini_hochberg(&p);
    for (i, w) in works.iter_mut().enumerate() {
        w.p_value = Some(p[i]);
        w.p_adjusted = Some(holm[i]);
        w.q_value = Some(bh[i]);
    }
    let smallest = 1.0 / (control_stats.len() + 1) as f64;
    let m = works.len().max(1);
    if smallest * m as f64 >= th.significance {
        notes.push(format!(
            "with {} controls the smallest Holm-adjusted p-value {m} work(s) can reach is {:.3}, not below the \
             significance level {}: give at least {} controls for `memorized-traces` to be possible",
            control_stats.len(),
            (smallest * m as f64).min(1.0),
            th.significance,
            controls_needed(m, th.significance)
        ));
    }
    Calibration {
        statistic: "gain bits per token (code length under base − under merged)".into(),
        controls: control_stats.len(),
        smallest_p: smallest,
        aa_check: calibrate::aa_check(control_stats),
    }
}

/// How the copy statistic was calibrated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CopyCalibration {
    pub statistic: String,
    /// Controls whose extraction ran (the null sample of the copy statistic).
    pub controls: usize,
    /// The smallest Holm-adjusted p-value a work could reach with this many controls.
    pub smallest_p_adjusted: f64,
    /// Whether that is below the significance level, so copy verdicts can be calibrated.
    pub powered: bool,
    /// Controls (with extraction) needed for a calibrated copy verdict on these works.
    pub controls_needed: usize,
    /// The largest copy statistic among the controls with extraction; a work's must be at
    /// least `copy_margin` times this.
    pub largest_control_bits: f64,
    /// Controls that got a copy verdict when judged like a work against the other controls.
    pub failures: Vec<String>,
}

/// Controls needed so that the strongest of `works` works can reach Holm-adjusted p < α with
/// empirical p-values, whose smallest value is 1/(n+1): n = ⌊m/α⌋.
pub(crate) fn controls_needed(works: usize, alpha: f64) -> usize {
    (works.max(1) as f64 / alpha).floor() as usize
}

/// Copy p-values: each work against the extracted controls (Holm across works), each extracted
/// control against the other extracted controls, adjusted by the factor Holm gives the strongest
/// of the works. Texts without extraction get none. Returns the number of extracted controls
/// and their largest statistic.
fn copy_p_values(works: &mut [WorkEvidence], controls: &mut [WorkEvidence], margin: f64) -> (usize, f64) {
    let null: Vec<(usize, f64)> =
        controls.iter().enumerate().filter(|(_, c)| c.extracted).map(|(i, c)| (i, c.evidence_bits)).collect();
    if null.is_empty() {
        return (0, 0.0);
    }
    let values: Vec<f64> = null.iter().map(|(_, s)| *s).collect();
    let largest = values.iter().copied().fold(0.0, f64::max);
    let p: Vec<f64> = works.iter().map(|w| empirical_p(w.evidence_bits, &values)).collect();
    for (w, (p, adj)) in works.iter_mut().zip(p.iter().zip(holm(&p))) {
        w.copy_p_value = Some(*p);
        w.copy_p_adjusted = Some(adj);
        w.copy_margin_met = w.evidence_bits > 0.0 && w.evidence_bits >= margin * largest;
    }
    let m = works.len().max(1) as f64;
    for (k, &(i, s)) in null.iter().enumerate() {
        let others: Vec<f64> = values.iter().enumerate().filter(|(j, _)| *j != k).map(|(_, v)| *v).collect();
        if others.is_empty() {
            continue;
        }
        let p = empirical_p(s, &others);
        controls[i].copy_p_value = Some(p);
        controls[i].copy_p_adjusted = Some((p * m).min(1.0));
        controls[i].copy_margin_met = s > 0.0 && s >= margin * others.iter().copied().fold(0.0, f64::max);
    }
    (null.len(), largest)
}

/// Set every text's verdict; returns the copy calibration and notes for the report.
pub(crate) fn decide(
    works: &mut [WorkEvidence],
    controls: &mut [WorkEvidence],
    th: &Thresholds,
) -> (CopyCalibration, Vec<String>) {
    let (n, largest_control_bits) = copy_p_values(works, controls, th.copy_margin);
    let m = works.len().max(1);
    let smallest = (m as f64 / (n + 1) as f64).min(1.0);
    let powered = n > 0 && smallest < th.significance;
    let needed = controls_needed(m, th.significance);
    let mut notes = vec![];
    for w in works.iter_mut() {
        (w.verdict, w.verdict_reason) = judge(w, th, powered, n, needed, false);
    }
    let mut failures = vec![];
    for c in controls.iter_mut() {
        (c.verdict, c.verdict_reason) = judge(c, th, powered, n, needed, true);
        if c.verdict.is_copy() {
            failures.push(c.id.clone());
        }
    }
    if !failures.is_empty() {
        notes.push(format!(
            "CALIBRATION FAILURE: {} control(s) never trained on got a copy verdict when judged like a work against \
             the other controls ({}). Reproduced, improbable spans are not rare on texts like these without \
             training, so copy verdicts on works with no more evidence than these controls are not reliable.",
            failures.len(),
            failures.join(", ")
        ));
    }
    if !powered {
        notes.push(format!(
            "copy verdicts are not calibrated: {n} control(s) with extraction make {smallest:.3} the smallest \
             Holm-adjusted p-value {m} work(s) can reach, not below {}; give at least {needed} controls of the same \
             kind. Until then only an overwhelming reproduction (≥ {:.0}% of the work in spans the base finds \
             improbable, ≥ {:.0} bits) is called a copy.",
            th.significance,
            100.0 * th.substantial,
            th.overwhelming_bits
        ));
    }
    let calibration = CopyCalibration {
        statistic: "evidence bits: the base's surprisal of the characters the merged model reproduced in improbable \
                    spans and the base did not"
            .into(),
        controls: n,
        smallest_p_adjusted: smallest,
        powered,
        controls_needed: needed,
        largest_control_bits,
        failures,
    };
    (calibration, notes)
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// Cooper & Grimmelmann's test (a near-exact copy of a substantial portion reconstructable from
/// the model), attributed to the adapter by subtracting what the base reproduces, counting only
/// spans the base finds improbable, and calibrated on the controls.
fn judge(
    w: &WorkEvidence,
    th: &Thresholds,
    powered: bool,
    n: usize,
    needed: usize,
    control: bool,
) -> (Verdict, String) {
    let who = if control { "control text (judged against the other controls): " } else { "" };
    let has_span = w.evidence_bits >= th.min_span_bits;
    let substantial = has_span && w.coverage_attributable >= th.substantial;
    let spans = format!(
        "{} of the work reproduced verbatim by the merged model and not the base in {} span(s) the base finds \
         improbable (≥ {:.0} bits each; {:.0} bits in all; longest {} chars)",
        pct(w.coverage_attributable),
        w.improbable_spans_merged,
        th.min_span_bits,
        w.evidence_bits,
        w.longest_improbable_span_chars
    );
    match (powered, w.copy_p_adjusted) {
        (true, Some(p)) if has_span && p < th.significance && w.copy_margin_met => {
            let v = if substantial { Verdict::ReconstructableCopy } else { Verdict::PartialCopy };
            let floor = if substantial {
                format!("at or above the substantial-portion threshold {}", pct(th.substantial))
            } else {
                format!("below the substantial-portion threshold {}", pct(th.substantial))
            };
            return (
                v,
                format!(
                    "{who}{spans}, {floor}; more than the controls (Holm-adjusted p = {p:.3} < {}) and at least \
                     {}× the largest control's",
                    th.significance, th.copy_margin
                ),
            );
        }
        (false, _) if substantial && w.evidence_bits >= th.overwhelming_bits => {
            return (
                Verdict::ReconstructableCopy,
                format!(
                    "{who}{spans}. Not calibrated ({n} controls with extraction; {needed} needed), but overwhelming: \
                     the base would produce this text by chance with probability below 2^-{:.0}",
                    th.overwhelming_bits
                ),
            );
        }
        _ => {}
    }
    let capped = if !has_span {
        String::new()
    } else if powered {
        format!(
            "; {spans}, but no more than the controls show (Holm-adjusted p = {:.3}; margin over the largest control \
             {})",
            w.copy_p_adjusted.unwrap_or(1.0),
            if w.copy_margin_met { "met" } else { "not met" }
        )
    } else {
        format!("; {spans}, but with {n} controls with extraction this cannot be calibrated (give {needed})")
    };
    if let Some(p) = w.p_adjusted.filter(|&p| p < th.significance && !control) {
        return (
            Verdict::MemorizedTraces,
            format!(
                "no calibrated reproduction, but the adapter saves {:.1} bits ({}) on this work, more than on the \
                 controls (Holm-adjusted p = {p:.3} < {}){capped}",
                w.gain_bits,
                pct(w.gain_fraction),
                th.significance
            ),
        );
    }
    let why = match (w.p_adjusted, control) {
        (_, true) => format!("control text: no calibrated reproduction; gain {:.1} bits{capped}", w.gain_bits),
        (Some(p), false) => {
            format!("no calibrated reproduction; gain {:.1} bits, Holm-adjusted p = {p:.3}{capped}", w.gain_bits)
        }
        (None, false) => {
            format!("no calibrated reproduction; gain {:.1} bits (no controls to calibrate it){capped}", w.gain_bits)
        }
    };
    (Verdict::NoEvidence, why)
}
