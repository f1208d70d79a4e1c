//! The realistic case the probe must not get wrong: a LoRA fine-tuned normally on texts of one
//! homogeneous domain (templated sentences sharing boilerplate), some of them the claimed works,
//! with many same-domain texts never trained on as controls. The merged model continues the
//! domain's boilerplate on any text, so long verbatim spans appear on controls too; they are not
//! evidence of copying. No control may get a copy verdict; works that are learned but not
//! reproduced get `memorized-traces` with enough controls and `no-evidence` without.

use std::path::PathBuf;
use std::sync::OnceLock;

use lorascope::fixtures::{Rng, TinyLlama};
use lorascope::load::works::Work;
use lorascope::model::train::{fit_lora, write_peft_dir, FitOptions};
use lorascope::model::{merge_adapter, Llama, TextModel};
use lorascope::probe::{self, ProbeResult, Quiet, Thresholds, Verdict};
use lorascope::{BaseModel, LoadOptions};

/// Sentences every text of the domain shares (documentation boilerplate).
const BOILERPLATE: [&str; 4] = [
    "the configuration file is read once at startup and every value can be changed later.",
    "see the reference section for the complete list of options and their default values.",
    "this function is safe to call from several threads at the same time without a lock.",
    "errors are reported with the name of the file and the line where the problem was found.",
];
const OBJECTS: [&str; 10] =
    ["parser", "reader", "writer", "index", "buffer", "router", "loader", "queue", "socket", "driver"];
const ATTRS: [&str; 8] = ["size", "name", "state", "owner", "limit", "offset", "mode", "timeout"];
const STATES: [&str; 6] = ["closed", "empty", "locked", "stale", "full", "missing"];

/// A made-up word of `syllables` syllables: only a model that saw the text can predict it.
fn word(rng: &mut Rng, syllables: usize) -> String {
    const C: &[u8] = b"bdfgklmnprstvz";
    const V: &[u8] = b"aeiou";
    (0..syllables)
        .flat_map(|_| {
            let c = C[(rng.next_u64() % C.len() as u64) as usize] as char;
            let v = V[(rng.next_u64() % V.len() as u64) as usize] as char;
            [c, v]
        })
        .collect()
}

/// One text of the domain: a templated sentence, two boilerplate sentences, and a sentence
/// naming the text's own made-up setting (its unique content), seeded.
fn domain_text(rng: &mut Rng) -> String {
    let pick = |rng: &mut Rng, n: usize| (rng.next_u64() % n as u64) as usize;
    let (o1, o2, a) = (OBJECTS[pick(rng, 10)], OBJECTS[pick(rng, 10)], ATTRS[pick(rng, 8)]);
    let s = STATES[pick(rng, 6)];
    let (b1, b2) = (BOILERPLATE[pick(rng, 4)], BOILERPLATE[pick(rng, 4)]);
    let (w1, w2) = (word(rng, 3), word(rng, 2));
    format!("the {o1} returns the {a} of the {o2}. {b1} the {w1} setting is {s} unless {w2} is set. {b2}")
}

fn texts(seed: u64, n: usize) -> Vec<Work> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let text = domain_text(&mut rng);
            Work { id: format!("t{seed}-{i:03}"), sha256: String::new(), text }
        })
        .collect()
}

struct Setup {
    model: TextModel,
    merged: Llama,
    works: Vec<Work>,
    controls: Vec<Work>,
}

/// A base, and a LoRA trained briefly on 16 domain texts, two of them the claimed works.
fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("probe-domain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let tiny = TinyLlama { vocab: 64, hidden: 64, intermediate: 128, layers: 2, heads: 4, kv_heads: 2 };
        tiny.write_hf_dir_scaled(&dir.join("base"), 21, 0.3).unwrap();
        let train = texts(1, 8);
        let base = BaseModel::open(&dir.join("base")).unwrap();
        let model = TextModel::load(&base, &candle_core::Device::Cpu).unwrap();
        let opts = FitOptions { max_steps: 80, lr: 1e-2, seed: 5, chunk_stride: 0, ..Default::default() };
        let t = std::time::Instant::now();
        let corpus: Vec<String> = train.iter().map(|w| w.text.clone()).collect();
        let (st, cfg, fit) = fit_lora(&model, &corpus, &opts, &|_, _| {}).unwrap();
        eprintln!("fit: {fit:?} in {:.1} s", t.elapsed().as_secs_f64());
        write_peft_dir(&dir.join("domain-lora"), &st, &cfg).unwrap();
        let (a, b) =
            lorascope::open(&dir.join("domain-lora"), Some(&dir.join("base")), &LoadOptions::default()).unwrap();
        let model = TextModel::load(b.as_ref().unwrap(), &candle_core::Device::Cpu).unwrap();
        let (merged, _) = merge_adapter(&model.llama, &a).unwrap();
        Setup { model, merged, works: train[..2].to_vec(), controls: texts(2, 40) }
    })
}

fn thresholds() -> Thresholds {
    Thresholds { prefix_tokens: 16, new_tokens: 64, stride: 25, ..Default::default() }
}

/// One line per text, printed when an assertion fails (run with --nocapture to see them all).
fn show(r: &ProbeResult) -> String {
    let mut out = String::new();
    for w in r.works.iter().chain(&r.controls) {
        out += &format!(
            "{} {:?} gain/token {:.3} coverage {:.3} evidence {:.0} bits copy-p {:?} | {}\n",
            w.id,
            w.verdict,
            w.gain_per_token(),
            w.coverage_attributable,
            w.evidence_bits,
            w.copy_p_adjusted,
            w.verdict_reason
        );
    }
    out
}

#[test]
fn same_domain_controls_get_no_copy_verdict_and_learned_works_are_traces() {
    let s = setup();
    let r = probe::run(&s.model, &s.merged, &s.works, &s.controls, &[], &thresholds(), &Quiet).unwrap();
    let table = show(&r);
    eprint!("{table}");
    // The trap is real: the merged model reproduces the domain's boilerplate on texts it never
    // saw, in spans a random base finds improbable, and the old rule (any adapter-attributable
    // span) would have called those controls partial copies.
    let reproduced = r.controls.iter().filter(|c| c.evidence_bits > 0.0).count();
    assert!(reproduced >= 3, "only {reproduced} controls reproduce boilerplate\n{table}");
    // The controls are the null: none of them is a copy, judged like a work against the others.
    assert!(r.controls.iter().all(|c| !c.verdict.is_copy()), "{table}");
    assert!(r.copy_calibration.failures.is_empty() && r.copy_calibration.powered, "{:?}", r.copy_calibration);
    // The works were learned (each gains more per token than every control: p = 1/41, Holm
    // over two works 2/41 < 0.05) but not reproduced beyond what the controls show.
    for w in &r.works {
        assert_eq!(w.p_value, Some(1.0 / 41.0), "{table}");
        assert_eq!(w.verdict, Verdict::MemorizedTraces, "{}: {}", w.id, w.verdict_reason);
    }
}

#[test]
fn with_too_few_controls_learned_works_are_no_evidence_and_the_report_says_how_many_are_needed() {
    let s = setup();
    let r = probe::run(&s.model, &s.merged, &s.works, &s.controls[..5], &[], &thresholds(), &Quiet).unwrap();
    let table = show(&r);
    for w in r.works.iter().chain(&r.controls) {
        assert_eq!(w.verdict, Verdict::NoEvidence, "{table}");
    }
    // Two works at α = 0.05 need ⌊2/0.05⌋ = 40 controls.
    assert!(!r.copy_calibration.powered && r.copy_calibration.controls_needed == 40);
    assert!(r.notes.iter().any(|n| n.contains("give at least 40 controls")), "{:?}", r.notes);
}

#[test]
fn a_seeded_subset_of_controls_calibrates_spans_while_every_control_calibrates_the_gain() {
    let s = setup();
    let th = Thresholds { control_windows: 60, ..thresholds() };
    let r = probe::run(&s.model, &s.merged, &s.works, &s.controls, &[], &th, &Quiet).unwrap();
    let table = show(&r);
    let extracted: Vec<&str> = r.controls.iter().filter(|c| c.extracted).map(|c| c.id.as_str()).collect();
    let windows: usize = r.controls.iter().map(|c| c.windows).sum();
    assert!(windows <= 60 && extracted.len() >= 3 && extracted.len() < 40, "{extracted:?} ({windows} windows)");
    assert!(r.controls.iter().filter(|c| !c.extracted).all(|c| c.windows == 0));
    assert_eq!(r.copy_calibration.controls, extracted.len());
    // The gain is still calibrated on all 40 controls, so the learned works remain traces.
    for w in &r.works {
        assert_eq!(w.p_value, Some(1.0 / 41.0), "{table}");
        assert_eq!(w.verdict, Verdict::MemorizedTraces, "{table}");
    }
    // The subset is seeded: the same controls every run.
    let again = probe::run(&s.model, &s.merged, &s.works, &s.controls, &[], &th, &Quiet).unwrap();
    let again: Vec<&str> = again.controls.iter().filter(|c| c.extracted).map(|c| c.id.as_str()).collect();
    assert_eq!(extracted, again);
}
