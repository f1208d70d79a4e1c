//! The last phases: works calibrated against the controls on the gain in bits per token
//! (empirical p-values with Holm and Benjamini–Hochberg adjustments, ROC-AUC, notes on what the
//! controls cannot support), then a verdict for every work and control (docs/probe.md).

use super::calibrate::{self, Auc};
use super::{Calibration, Thresholds, Verdict, WorkEvidence};

/// What the controls say about the works.
pub struct Calibrated {
    pub calibration: Option<Calibration>,
    pub auc: Option<Auc>,
    pub notes: Vec<String>,
}

/// Write each work's p-values (when there are controls) and measure how works and controls
/// separate.
pub fn calibrate(works: &mut [WorkEvidence], controls: &[WorkEvidence], th: &Thresholds) -> Calibrated {
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
    if smallest >= th.significance {
        notes.push(format!(
            "with {} controls the smallest reachable p-value is {smallest:.3}, so no work can reach the \
             significance level {}: give at least {} controls for `memorized-traces` to be possible",
            control_stats.len(),
            th.significance,
            (1.0 / th.significance).ceil() as usize
        ));
    }
    Calibration {
        statistic: "gain bits per token (code length under base − under merged)".into(),
        controls: control_stats.len(),
        smallest_p: smallest,
        aa_check: calibrate::aa_check(control_stats),
    }
}

/// Set the verdict and its reason of every work and control.
pub fn judge(works: &mut [WorkEvidence], controls: &mut [WorkEvidence], th: &Thresholds) {
    for (w, control) in works.iter_mut().map(|w| (w, false)).chain(controls.iter_mut().map(|w| (w, true))) {
        let (v, why) = verdict(w, th, control);
        w.verdict = v;
        w.verdict_reason = why;
    }
}

/// Cooper & Grimmelmann's test: a near-exact copy of a substantial portion reconstructable from
/// the model, attributed to the adapter by subtracting what the base already reproduces.
fn verdict(w: &WorkEvidence, th: &Thresholds, control: bool) -> (Verdict, String) {
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    if w.coverage_attributable >= th.substantial {
        return (
            Verdict::ReconstructableCopy,
            format!(
                "{} of the work is reproduced verbatim (spans ≥ {} chars) by the merged model and not by the base \
                 (threshold {}); longest span {} chars",
                pct(w.coverage_attributable),
                th.min_span_chars,
                pct(th.substantial),
                w.longest_span_chars
            ),
        );
    }
    if w.attributable_windows > 0 || w.coverage_attributable > 0.0 {
        return (
            Verdict::PartialCopy,
            format!(
                "{} of {} windows reproduced near-verbatim under merged and not base; {} of the work covered by \
                 adapter-attributable spans, below the substantial-portion threshold {}",
                w.attributable_windows,
                w.windows,
                pct(w.coverage_attributable),
                pct(th.substantial)
            ),
        );
    }
    if let Some(p) = w.p_adjusted.filter(|&p| p < th.significance) {
        return (
            Verdict::MemorizedTraces,
            format!(
                "no reproduction, but the adapter saves {:.1} bits ({}) on this work, more than on the controls \
                 (Holm-adjusted p = {p:.3} < {})",
                w.gain_bits,
                pct(w.gain_fraction),
                th.significance
            ),
        );
    }
    let why = match (w.p_adjusted, control) {
        (_, true) => format!("control text: no adapter-attributable reproduction; gain {:.1} bits", w.gain_bits),
        (Some(p), false) => {
            format!("no adapter-attributable reproduction; gain {:.1} bits, Holm-adjusted p = {p:.3}", w.gain_bits)
        }
        (None, false) => {
            format!("no adapter-attributable reproduction; gain {:.1} bits (no controls to calibrate it)", w.gain_bits)
        }
    };
    (Verdict::NoEvidence, why)
}
