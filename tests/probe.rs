//! The merged-model probe end to end on a tiny llama: a LoRA trained here memorises three
//! planted texts; three controls stay unseen. Plus the runtime's own checks: a hand-computed
//! forward pass, merged vs unmerged LoRA, a zero adapter, and GGUF vs candle's quantized llama.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lorascope::fixtures::{write_tiny_llama_gguf, TinyLlama};
use lorascope::load::works::{load_works, Work};
use lorascope::model::train::{fit_lora, write_peft_dir, FitOptions, FitReport};
use lorascope::model::{
    apply_adapter, continue_and_score, greedy, merge_adapter, score, Llama, Precision, RunOptions, TextModel,
};
use lorascope::probe::{self, Quiet, Thresholds, Verdict};
use lorascope::{BaseModel, LoadOptions};

const PLANTED: [&str; 3] = [
    "the lighthouse keeper counted the ships each night and wrote their names in a blue ledger that nobody else was allowed to read, not even the gulls.",
    "in the valley of seven bridges the river spoke only on tuesdays, and the millers kept their questions short so that every answer would fit.",
    "a clockmaker once built a clock that ran backwards; each morning it was younger, and each evening the town forgot one more of its old quarrels.",
];
const CONTROLS: [&str; 3] = [
    "the orchard behind the school grew pears so heavy that the branches bent to the ground, and the children ate them before the bell could ring.",
    "every winter the baker left one loaf on the window ledge for the fox, who never came, until the year the snow did not melt before may.",
    "on the night of the long storm the radio played the same song eleven times, and by morning the whole street could sing it backwards.",
];

fn tiny() -> TinyLlama {
    TinyLlama { vocab: 64, hidden: 64, intermediate: 128, layers: 2, heads: 4, kv_heads: 2 }
}

struct Setup {
    dir: PathBuf,
    fit: FitReport,
}

fn write_texts(dir: &Path, texts: &[&str], stem: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for (i, t) in texts.iter().enumerate() {
        std::fs::write(dir.join(format!("{stem}-{}.txt", i + 1)), t).unwrap();
    }
}

/// Train once for every test of this file: base model, planted adapter, a zero adapter.
fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        tiny().write_hf_dir_scaled(&dir.join("base"), 11, 0.3).unwrap();
        write_texts(&dir.join("works"), &PLANTED, "planted");
        write_texts(&dir.join("controls"), &CONTROLS, "control");
        let base = BaseModel::open(&dir.join("base")).unwrap();
        let model = TextModel::load(&base, &candle_core::Device::Cpu).unwrap();
        let texts: Vec<String> = PLANTED.iter().map(|s| s.to_string()).collect();
        let opts = FitOptions { max_steps: 600, seed: 3, ..Default::default() };
        let (st, cfg, fit) = fit_lora(&model, &texts, &opts, &|_, _| {}).unwrap();
        write_peft_dir(&dir.join("planted-lora"), &st, &cfg).unwrap();
        // Zero steps: A random, B zero, so ΔW = 0 exactly.
        let zero = FitOptions { max_steps: 0, seed: 4, ..Default::default() };
        let (st, cfg, _) = fit_lora(&model, &texts, &zero, &|_, _| {}).unwrap();
        write_peft_dir(&dir.join("zero-lora"), &st, &cfg).unwrap();
        Setup { dir, fit }
    })
}

fn open(adapter: &str) -> (TextModel, Llama, lorascope::Adapter) {
    let s = setup();
    let (a, b) = lorascope::open(&s.dir.join(adapter), Some(&s.dir.join("base")), &LoadOptions::default()).unwrap();
    let model = TextModel::load(b.as_ref().unwrap(), &candle_core::Device::Cpu).unwrap();
    let (merged, _) = merge_adapter(&model.llama, &a).unwrap();
    (model, merged, a)
}

fn works(name: &str) -> Vec<Work> {
    load_works(&setup().dir.join(name)).unwrap().works
}

fn thresholds() -> Thresholds {
    // Character-level tokens: 64 new tokens reach past the 50-character span threshold.
    Thresholds { prefix_tokens: 16, new_tokens: 64, stride: 50, ..Default::default() }
}

#[test]
fn planted_works_are_reconstructable_copies_and_controls_are_not() {
    let s = setup();
    assert!(s.fit.memorised, "trainer did not memorise the planted texts: {:?}", s.fit);
    let (model, merged, a) = open("planted-lora");
    // Gradients reached every adapted module (q and k only through the attention softmax).
    let (_, summary) = merge_adapter(&model.llama, &a).unwrap();
    assert!(summary.zero.is_empty() && summary.merged.len() == 14, "{summary:?}");
    let r = probe::run(&model, &merged, &works("works"), &works("controls"), &[], &thresholds(), &Quiet).unwrap();
    for w in &r.works {
        assert_eq!(w.verdict, Verdict::ReconstructableCopy, "{}: {}", w.id, w.verdict_reason);
        assert!(w.coverage_attributable >= 0.5 && w.longest_span_chars >= 50, "{w:?}");
        assert_eq!(w.e1_windows_base, 0);
        // The whole text is given back: the merged model spends almost nothing on it.
        assert!(w.gain_fraction > 0.9, "{}: gain fraction {}", w.id, w.gain_fraction);
    }
    for c in &r.controls {
        assert_eq!(c.verdict, Verdict::NoEvidence, "{}: {}", c.id, c.verdict_reason);
        assert_eq!(c.reproduced_spans_merged, 0);
    }
    let min_planted = r.works.iter().map(|w| w.gain_bits).fold(f64::INFINITY, f64::min);
    let max_control = r.controls.iter().map(|w| w.gain_bits.abs()).fold(0.0, f64::max);
    // The adapter also learned the language of the texts (the base is random), so controls
    // gain too, but each planted text gains several times more than any control.
    assert!(min_planted > 3.0 * max_control.max(10.0), "planted {min_planted} vs controls {max_control}");
    // Works score above every control: p = 1/(n+1), AUC 1 (members are the positive class).
    for w in &r.works {
        assert_eq!(w.p_value, Some(0.25));
    }
    assert_eq!(r.auc.as_ref().map(|a| a.value), Some(1.0));
    // The longest passage is shown beside the original text, which it matches.
    let p = r.works[0].longest_passage.as_ref().unwrap();
    assert!(PLANTED[0].contains(p.original.trim()), "{p:?}");
    assert_eq!(p.generated.trim(), p.original.trim());
}

#[test]
fn neutral_prompts_that_lead_into_a_work_are_found_by_the_span_search() {
    let (model, merged, _) = open("planted-lora");
    // Not a window of any work: a prompt a moderator might try, which happens to open planted-2.
    let prompts = vec!["in the valley of seven".to_string(), "zzz qqq".to_string()];
    let th = Thresholds { prefix_tokens: 16, new_tokens: 120, stride: 1000, ..Default::default() };
    let r = probe::run(&model, &merged, &works("works"), &[], &prompts, &th, &Quiet).unwrap();
    let w = r.works.iter().find(|w| w.id == "planted-2").unwrap();
    assert!(w.cross_prompt_spans_merged >= 1, "{:?}", w.span_sources);
    let src = w.span_sources.iter().find(|s| s.source == "prompt:1" && s.model == "merged").unwrap();
    assert!(src.chars >= 100, "{src:?}");
    // The base, a random model, reproduces nothing; nothing comes from the nonsense prompt.
    assert!(w.span_sources.iter().all(|s| s.model == "merged" && s.source != "prompt:2"));
    assert_eq!(r.prompts, 2);
}

#[test]
fn zero_adapter_gives_exactly_zero_gain() {
    let (model, merged, a) = open("zero-lora");
    let (_, summary) = merge_adapter(&model.llama, &a).unwrap();
    assert!(summary.merged.is_empty() && summary.zero.len() == a.modules.len());
    let r = probe::run(&model, &merged, &works("works"), &works("controls"), &[], &thresholds(), &Quiet).unwrap();
    for w in r.works.iter().chain(&r.controls) {
        assert_eq!(w.gain_bits, 0.0, "{}", w.id);
        assert_eq!(w.mem_bits, 0.0);
        assert_eq!(w.coverage_attributable, 0.0);
        assert_eq!(w.verdict, Verdict::NoEvidence);
    }
}

#[test]
fn merged_logits_equal_base_plus_unmerged_lora() {
    let (model, merged, a) = open("planted-lora");
    let (unmerged, _) = apply_adapter(&model.llama, &a).unwrap();
    let ids = model.encode_with_bos(PLANTED[1]).unwrap();
    let x = candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = |m: &Llama, exact: bool| {
        let h = m.hidden(&x, None, exact).unwrap().squeeze(0).unwrap();
        m.logits(&h).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (lm, lu, lb) = (logits(&merged, false), logits(&unmerged, true), logits(&model.llama, false));
    let diff = lm.iter().zip(&lu).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff < 1e-4, "merged vs unmerged max |Δlogit| = {diff}");
    // And the adapter does change the output.
    let moved = lm.iter().zip(&lb).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(moved > 1.0, "adapter moved logits by only {moved}");
}

/// Max |Δ| between the logits of two models on `ids`.
fn logit_gap(a: &Llama, b: &Llama, ids: &[u32]) -> f32 {
    let x = candle_core::Tensor::new(ids, &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = |m: &Llama| {
        let h = m.hidden(&x, None, false).unwrap().squeeze(0).unwrap();
        m.logits(&h).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    logits(a).iter().zip(&logits(b)).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max)
}

#[test]
fn unmerged_dora_rslora_patterns_embedding_and_replaced_head_match_the_f32_merge() {
    // PEFT adapters with rank/alpha patterns and either DoRA + rsLoRA on q/v, or an embedding
    // LoRA plus a modules_to_save output head: each form run beside the frozen weights must give
    // the logits of W + ΔW merged in f32.
    let cfg = TinyLlama::default();
    let dir = tempfile::tempdir().unwrap();
    cfg.write_hf_dir(&dir.path().join("base"), 3).unwrap();
    for dora in [false, true] {
        let (st, c) = lorascope::fixtures::peft_llama(&cfg, 2, dora);
        let ad = dir.path().join(format!("adapter-{dora}"));
        write_peft_dir(&ad, &st, &c).unwrap();
        let (a, b) = lorascope::open(&ad, Some(&dir.path().join("base")), &LoadOptions::default()).unwrap();
        let model = TextModel::load(b.as_ref().unwrap(), &candle_core::Device::Cpu).unwrap();
        let (merged, ms) = merge_adapter(&model.llama, &a).unwrap();
        let (unmerged, us) = apply_adapter(&model.llama, &a).unwrap();
        assert_eq!(ms.merged, us.merged, "dora {dora}");
        // Only the looked-up embedding and the replaced head need f32 matrices of their own.
        let want_dense: Vec<String> =
            if dora { vec![] } else { vec!["lm_head.weight".into(), "model.embed_tokens.weight".into()] };
        let mut dense = us.dense.clone();
        dense.sort();
        assert_eq!(dense, want_dense, "dora {dora}");
        let ids = model.encode_with_bos(PLANTED[0]).unwrap();
        let gap = logit_gap(&merged, &unmerged, &ids);
        assert!(gap <= 1e-4, "dora {dora}: merged vs unmerged max |Δlogit| = {gap}");
        assert!(logit_gap(&merged, &model.llama, &ids) > 0.1, "dora {dora}: the adapter changes nothing");
    }
}

/// Plain f64 loops over the stored weights: embedding, RMSNorm, rotary (HF half split),
/// grouped-query causal attention, SwiGLU, final norm, softmax.
fn reference_logprobs(base: &BaseModel, cfg: &TinyLlama, ids: &[u32]) -> Vec<(f64, f64, f64)> {
    let w = |k: &str| base.weight(k).unwrap();
    let (h, nh, nkv, d) = (cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim());
    let rms = |x: &[f64], g: &nalgebra::DMatrix<f64>| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        x.iter().enumerate().map(|(i, v)| v / (ms + 1e-5).sqrt() * g[(i, 0)]).collect()
    };
    let mv = |m: &nalgebra::DMatrix<f64>, x: &[f64]| -> Vec<f64> {
        (0..m.nrows()).map(|r| (0..m.ncols()).map(|c| m[(r, c)] * x[c]).sum()).collect()
    };
    let rope = |v: &mut [f64], pos: usize| {
        for hd in v.chunks_mut(d) {
            for i in 0..d / 2 {
                let a = pos as f64 / 10000f64.powf(2.0 * i as f64 / d as f64);
                let (x1, x2) = (hd[i], hd[i + d / 2]);
                hd[i] = x1 * a.cos() - x2 * a.sin();
                hd[i + d / 2] = x2 * a.cos() + x1 * a.sin();
            }
        }
    };
    let emb = w("model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = ids.iter().map(|&t| emb.row(t as usize).iter().copied().collect()).collect();
    for l in 0..cfg.layers {
        let p = format!("model.layers.{l}");
        let (wq, wk, wv, wo) = (
            w(&format!("{p}.self_attn.q_proj.weight")),
            w(&format!("{p}.self_attn.k_proj.weight")),
            w(&format!("{p}.self_attn.v_proj.weight")),
            w(&format!("{p}.self_attn.o_proj.weight")),
        );
        let n1 = w(&format!("{p}.input_layernorm.weight"));
        let (mut q, mut k, mut v) = (vec![], vec![], vec![]);
        for (pos, x) in xs.iter().enumerate() {
            let n = rms(x, &n1);
            let (mut qq, mut kk) = (mv(&wq, &n), mv(&wk, &n));
            rope(&mut qq, pos);
            rope(&mut kk, pos);
            q.push(qq);
            k.push(kk);
            v.push(mv(&wv, &n));
        }
        for t in 0..xs.len() {
            let mut out = vec![0.0; nh * d];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let s: Vec<f64> = (0..=t)
                    .map(|j| (0..d).map(|i| q[t][head * d + i] * k[j][kvh * d + i]).sum::<f64>() / (d as f64).sqrt())
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                for j in 0..=t {
                    for i in 0..d {
                        out[head * d + i] += (s[j] - mx).exp() / z * v[j][kvh * d + i];
                    }
                }
            }
            let o = mv(&wo, &out);
            for i in 0..h {
                xs[t][i] += o[i];
            }
            let n2 = rms(&xs[t], &w(&format!("{p}.post_attention_layernorm.weight")));
            let g = mv(&w(&format!("{p}.mlp.gate_proj.weight")), &n2);
            let u = mv(&w(&format!("{p}.mlp.up_proj.weight")), &n2);
            let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let dn = mv(&w(&format!("{p}.mlp.down_proj.weight")), &act);
            for i in 0..h {
                xs[t][i] += dn[i];
            }
        }
    }
    let head = w("lm_head.weight");
    let fin = w("model.norm.weight");
    (0..ids.len() - 1)
        .map(|t| {
            let logits = mv(&head, &rms(&xs[t], &fin));
            let mx = logits.iter().cloned().fold(f64::MIN, f64::max);
            let lz = mx + logits.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
            let lp: Vec<f64> = logits.iter().map(|x| x - lz).collect();
            let mean: f64 = lp.iter().map(|l| l.exp() * l).sum();
            let var: f64 = lp.iter().map(|l| l.exp() * (l - mean).powi(2)).sum();
            (lp[ids[t + 1] as usize], mean, var.sqrt())
        })
        .collect()
}

#[test]
fn one_layer_logprobs_match_hand_computed_softmax() {
    let cfg = TinyLlama { layers: 1, ..TinyLlama::default() };
    let dir = tempfile::tempdir().unwrap();
    cfg.write_hf_dir(dir.path(), 21).unwrap();
    let base = BaseModel::open(dir.path()).unwrap();
    let model = TextModel::load(&base, &candle_core::Device::Cpu).unwrap();
    let ids = model.encode_with_bos("the quick fox; 42!").unwrap();
    assert_eq!(ids[0], 1, "BOS from config.json");
    let reference = reference_logprobs(&base, &cfg, &ids);
    // Attention in blocks of one query gives the same numbers as in one block.
    let mut blocked = model.llama.clone();
    blocked.set_attention_budget(1);
    let opts = RunOptions { context: 256, batch_tokens: 64 };
    let got = &score(&blocked, std::slice::from_ref(&ids), opts, &|_| {}).unwrap()[0];
    for (t, r) in reference.iter().enumerate() {
        assert!((got.logp[t] - r.0).abs() < 1e-4, "blocked attention, token {t}: {} vs {}", got.logp[t], r.0);
    }
    // A context shorter than the text exercises the sliding windows too.
    for context in [256, 7] {
        let opts = RunOptions { context, batch_tokens: 64 };
        let got = &score(&model.llama, std::slice::from_ref(&ids), opts, &|_| {}).unwrap()[0];
        assert_eq!(got.logp.len(), ids.len() - 1);
        if context == 256 {
            for (t, (lp, mean, sd)) in reference.iter().enumerate() {
                assert!((got.logp[t] - lp).abs() < 1e-4, "token {t}: {} vs {lp}", got.logp[t]);
                assert!((got.mean[t] - mean).abs() < 1e-4 && (got.std[t] - sd).abs() < 1e-4);
            }
        } else {
            // Windows of 7 positions: the first window's tokens see the same context.
            for (t, r) in reference.iter().take(6).enumerate() {
                assert!((got.logp[t] - r.0).abs() < 1e-4);
            }
        }
    }
}

#[test]
fn suffix_logprobs_from_the_generation_prefill_match_a_plain_pass_over_prompt_and_suffix() {
    let cfg = TinyLlama::default();
    let dir = tempfile::tempdir().unwrap();
    cfg.write_hf_dir(dir.path(), 23).unwrap();
    let base = BaseModel::open(dir.path()).unwrap();
    let model = TextModel::load(&base, &candle_core::Device::Cpu).unwrap();
    let text = model.encode_with_bos("a fox ran over the hill; 7 owls sat still.").unwrap();
    // Three prompts of one length with targets of 9, 1 and 0 tokens, run as one batch.
    let prompts: Vec<Vec<u32>> = [0, 3, 6].iter().map(|&s| text[s..s + 8].to_vec()).collect();
    let targets: Vec<Vec<u32>> = vec![text[8..17].to_vec(), text[11..12].to_vec(), vec![]];
    let got = continue_and_score(&model.llama, &prompts, &targets, 5, None, 3, &|_| {}).unwrap();
    for (i, (p, t)) in prompts.iter().zip(&targets).enumerate() {
        assert_eq!(got[i].target_logp.len(), t.len());
        let seq: Vec<u32> = p.iter().chain(t).copied().collect();
        let reference = reference_logprobs(&base, &cfg, &seq);
        for (k, lp) in got[i].target_logp.iter().enumerate() {
            let want = reference[p.len() - 1 + k].0;
            assert!((lp - want).abs() < 1e-4, "prompt {i} target token {k}: {lp} vs {want}");
        }
        let alone = greedy(&model.llama, std::slice::from_ref(p), 5, None, 1, &|_| {}).unwrap();
        assert_eq!(got[i].tokens, alone[0], "scoring the target changed the continuation of prompt {i}");
    }
}

/// log-softmax of the logits at the last position of `ids`.
fn last_logprobs(m: &Llama, ids: &[u32]) -> Vec<f32> {
    let x = candle_core::Tensor::new(ids, &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let h = m.hidden(&x, None, false).unwrap();
    let last = h.narrow(1, ids.len() - 1, 1).unwrap().squeeze(1).unwrap();
    let logits = m.logits(&last).unwrap();
    candle_nn::ops::log_softmax(&logits, 1).unwrap().squeeze(0).unwrap().to_vec1().unwrap()
}

/// The same from candle-transformers' `quantized_llama`.
fn candle_last_logprobs(path: &std::path::Path, ids: &[u32]) -> Vec<f32> {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let mut f = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut reference = ModelWeights::from_gguf(content, &mut f, &candle_core::Device::Cpu).unwrap();
    let x = candle_core::Tensor::new(ids, &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = reference.forward(&x, 0).unwrap().squeeze(0).unwrap().unsqueeze(0).unwrap();
    candle_nn::ops::log_softmax(&logits, 1).unwrap().squeeze(0).unwrap().to_vec1().unwrap()
}

/// Greedy tokens of candle-transformers' `quantized_llama` (an independent llama on the same
/// GGUF: its own loading, rotary layout and attention) from `prompt`.
fn candle_greedy(path: &std::path::Path, prompt: &[u32], n: usize) -> Vec<u32> {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let mut f = std::fs::File::open(path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut reference = ModelWeights::from_gguf(content, &mut f, &candle_core::Device::Cpu).unwrap();
    let dev = candle_core::Device::Cpu;
    let mut theirs = vec![];
    let mut input = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..n {
        let x = candle_core::Tensor::new(input.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
        let logits = reference.forward(&x, pos).unwrap().squeeze(0).unwrap();
        pos += input.len();
        let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        theirs.push(next);
        input = vec![next];
    }
    theirs
}

#[test]
fn gguf_base_agrees_with_candle_quantized_llama() {
    let cfg = TinyLlama::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_llama_gguf(&cfg, 5, &path).unwrap();
    let base = BaseModel::open(&path).unwrap();
    let model = TextModel::load(&base, &candle_core::Device::Cpu).unwrap();
    let prompt = model.encode_with_bos("a clock ran").unwrap();
    let ours = greedy(&model.llama, std::slice::from_ref(&prompt), 12, None, 1, &|_| {}).unwrap().remove(0);
    assert_eq!(ours, candle_greedy(&path, &prompt, 12), "greedy tokens differ from candle's quantized_llama");
    // The tokenizer came from the GGUF metadata and round-trips.
    let text = "the river spoke on tuesdays";
    assert_eq!(model.tokenizer.decode(&model.tokenizer.encode(text).unwrap()).unwrap(), text);
}

#[test]
fn quantised_gguf_bases_run_on_their_blocks_and_agree_with_candle_quantized_llama() {
    use candle_core::quantized::GgmlDType;
    // Rows of 256 values: whole blocks of every type, the K-quants' 256 included.
    let cfg = TinyLlama { vocab: 64, hidden: 256, intermediate: 512, layers: 2, heads: 4, kv_heads: 2 };
    let dir = tempfile::tempdir().unwrap();
    for (dtype, name) in [
        (GgmlDType::Q8_0, "q8_0"),
        (GgmlDType::Q4_0, "q4_0"),
        (GgmlDType::Q4_1, "q4_1"),
        (GgmlDType::Q4K, "q4k"),
        (GgmlDType::Q5K, "q5k"),
        (GgmlDType::Q6K, "q6k"),
        (GgmlDType::F16, "f16"),
        (GgmlDType::BF16, "bf16"),
    ] {
        let path = dir.path().join(format!("{name}.gguf"));
        // Both runtimes quantise each product's input to 8-bit blocks, so a last-bit difference
        // in f32 (their interleaved rotary against our half-split one on un-permuted rows) can
        // move one activation across a rounding step. At a near-tie of the top two logits that
        // changes the greedy token: seed 11 under Q4_0 does so at its second token (logits
        // within 0.16% of each other); seeds 12–14 agree for every type.
        lorascope::fixtures::write_llama_gguf(&cfg, 12, dtype, &path).unwrap();
        let base = BaseModel::open(&path).unwrap();
        // A base this small would be widened to f32 by default (Precision::Auto).
        let model = TextModel::load_as(&base, &candle_core::Device::Cpu, Precision::Stored).unwrap();
        // Every matrix (embedding, 14 projections, output head) is held in the file's type.
        // A prompt of 3 positions: the prefill, like every decoding step, runs few enough rows
        // for the quantised kernel, the arithmetic quantized_llama uses.
        let prompt = model.encode_with_bos("ab").unwrap();
        assert!(prompt.len() <= 4);
        let ours = greedy(&model.llama, std::slice::from_ref(&prompt), 12, None, 1, &|_| {}).unwrap().remove(0);
        assert_eq!(ours, candle_greedy(&path, &prompt, 12), "{name}: greedy tokens differ from quantized_llama");
        // A longer prompt is multiplied with the weights decoded to f32 (activations unrounded):
        // its last position's log-probabilities stay close to quantized_llama's.
        let long = model.encode_with_bos("a clock ran down the stairs").unwrap();
        let (ours, theirs) = (last_logprobs(&model.llama, &long), candle_last_logprobs(&path, &long));
        let d = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // quantized_llama rounds every product's input to 8-bit blocks; on this random model
        // (log p spread over 15–17 nats) that moves log p by 0.2–0.4 nats for the quantised
        // types and by 1e-5 for f16/bf16. A wrong layout or block decode moves it by nats.
        let bound = if matches!(dtype, GgmlDType::F16 | GgmlDType::BF16) { 1e-4 } else { 0.6 };
        assert!(d < bound, "{name}: log p differs from quantized_llama's by {d} (bound {bound})");
        assert_eq!(
            model.llama.weight_summary().0,
            std::collections::BTreeMap::from([(name.to_string(), 16)]),
            "{name}"
        );
        assert_eq!(model.stored_weights, model.llama.weight_summary().0, "{name}");
        let auto = TextModel::load(&base, &candle_core::Device::Cpu).unwrap();
        assert_eq!((auto.precision, auto.stored_weights.clone()), (Precision::F32, model.stored_weights.clone()));
        assert_eq!(auto.llama.weight_summary().0, std::collections::BTreeMap::from([("f32".to_string(), 16)]));
    }
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lorascope")).args(args).output().unwrap()
}

#[test]
fn probe_cli_json_is_deterministic_and_follows_the_contract() {
    let s = setup();
    let p = |x: &str| s.dir.join(x).display().to_string();
    let (lora, base, w, c) = (p("planted-lora"), p("base"), p("works"), p("controls"));
    let args = [
        "probe",
        &lora,
        "--base",
        &base,
        "--works",
        &w,
        "--controls",
        &c,
        "--prefix-tokens",
        "16",
        "--new-tokens",
        "64",
        "--json",
        "--quiet",
    ];
    let (a, b) = (cli(&args), cli(&args));
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout, "two runs gave different JSON");
    let v: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    for key in ["works", "controls", "auc", "thresholds", "inputs", "modules", "totals"] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    for w in v["works"].as_array().unwrap() {
        for key in [
            "id",
            "sha256",
            "tokens",
            "bits_base",
            "bits_merged",
            "gain_bits",
            "gain_fraction",
            "mem_bits",
            "windows",
            "e1_windows_base",
            "e1_windows_merged",
            "e2_windows_base",
            "e2_windows_merged",
            "coverage_base",
            "coverage_merged",
            "longest_span_chars",
            "scores",
            "p_value",
            "p_adjusted",
            "verdict",
        ] {
            assert!(w.get(key).is_some(), "work lacks {key}");
        }
        assert_eq!(w["verdict"], "reconstructable-copy");
    }
    // Every work and control file is recorded with its hash.
    let roles: Vec<&str> = v["inputs"].as_array().unwrap().iter().map(|i| i["role"].as_str().unwrap()).collect();
    assert_eq!(roles.iter().filter(|r| **r == "work").count(), 3);
    assert_eq!(roles.iter().filter(|r| **r == "control").count(), 3);

    // CI gates: exit 1 on a matching verdict, 0 otherwise.
    let gate = |verdicts: &str| {
        cli(&[
            "probe",
            &lora,
            "--base",
            &base,
            "--works",
            &w,
            "--prefix-tokens",
            "16",
            "--new-tokens",
            "64",
            "--quiet",
            "--fail-on",
            verdicts,
        ])
        .status
        .code()
    };
    assert_eq!(gate("reconstructable-copy"), Some(1));
    assert_eq!(gate("memorized-traces"), Some(0));
}

#[test]
fn probe_refuses_bad_inputs_with_exit_2() {
    let s = setup();
    let p = |x: &str| s.dir.join(x).display().to_string();
    let weights = p("base/model.safetensors");
    // A bare weights file: no config or tokenizer to run.
    let out = cli(&["probe", &p("planted-lora"), "--base", &weights, "--works", &p("works"), "--quiet"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model.safetensors") && err.contains("Hugging Face model directory"), "{err}");
    // Missing works.
    let out = cli(&["probe", &p("planted-lora"), "--base", &p("base"), "--works", &p("nope"), "--quiet"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    // An adapter for another model: shapes do not fit this base.
    let other = tempfile::tempdir().unwrap();
    let (st, cfg) = lorascope::fixtures::peft_llama(&TinyLlama::default(), 2, false);
    write_peft_dir(other.path(), &st, &cfg).unwrap();
    let out =
        cli(&["probe", &other.path().display().to_string(), "--base", &p("base"), "--works", &p("works"), "--quiet"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn report_includes_the_probe() {
    let s = setup();
    let p = |x: &str| s.dir.join(x).display().to_string();
    let out_dir = tempfile::tempdir().unwrap();
    let o = out_dir.path().display().to_string();
    let out = cli(&[
        "report",
        &p("planted-lora"),
        "--base",
        &p("base"),
        "--works",
        &p("works"),
        "--controls",
        &p("controls"),
        "--prefix-tokens",
        "16",
        "--new-tokens",
        "64",
        "--out",
        &o,
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.path().join("report.json")).unwrap()).unwrap();
    let stage = v["stages"].as_array().unwrap().iter().find(|s| s["name"] == "probe").unwrap().clone();
    assert_eq!(stage["ran"], true);
    assert_eq!(v["probe"]["works"].as_array().unwrap().len(), 3);
    // Each work and control file recorded once, though both the probe and the report read them.
    assert_eq!(v["inputs"].as_array().unwrap().iter().filter(|i| i["role"] == "work").count(), 3);
    let html = std::fs::read_to_string(out_dir.path().join("report.html")).unwrap();
    assert!(html.contains("Is it a copy of these works?") && html.contains("3 can be reconstructed from it"));
    assert_eq!(html.matches("<svg class=\"works\"").count(), 1);
    let r: lorascope::report::Report = serde_json::from_value(v).unwrap();
    assert_eq!(r.probe.unwrap().result.works[0].verdict, Verdict::ReconstructableCopy);
}

/// A text's bits under a model whose tokenizer adds BOS (the fixture's, Llama's `<s> $A`) and
/// under the same model whose tokenizer adds none (SmolLM2, Qwen2.5): with BOS every token is
/// scored; without it the first token has no context and is not scored, as transformers'
/// `-sum(log p)` over `tokenizer(text)` does. Both against the plain reference forward pass.
#[test]
fn bos_follows_the_tokenizer_and_an_unscored_first_token_is_left_out() {
    use lorascope::model::BosRule;
    let cfg = TinyLlama { layers: 1, ..TinyLlama::default() };
    let dir = tempfile::tempdir().unwrap();
    let (with, without) = (dir.path().join("with"), dir.path().join("without"));
    cfg.write_hf_dir(&with, 21).unwrap();
    cfg.write_hf_dir(&without, 21).unwrap();
    let tj = without.join("tokenizer.json");
    let mut t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tj).unwrap()).unwrap();
    assert!(!t["post_processor"].is_null(), "the fixture tokenizer adds BOS");
    t["post_processor"] = serde_json::Value::Null;
    std::fs::write(&tj, serde_json::to_string(&t).unwrap()).unwrap();
    let text = "the quick fox; 42!";
    write_texts(&dir.path().join("works"), &[text], "w");
    let works = load_works(&dir.path().join("works")).unwrap().works;

    let bits = |base_dir: &Path, rule: BosRule| {
        let base = BaseModel::open(base_dir).unwrap();
        let model = TextModel::load(&base, &candle_core::Device::Cpu).unwrap();
        let th = Thresholds { bos: rule, ..Default::default() };
        let r = probe::run(&model, &model.llama, &works, &[], &[], &th, &Quiet).unwrap();
        (model.context_tokens(rule).unwrap(), r.works[0].bits_base, r.notes.join(" "))
    };
    let base = BaseModel::open(&with).unwrap();
    let model = TextModel::load(&base, &candle_core::Device::Cpu).unwrap();
    let ids = model.tokenizer.encode(text).unwrap();
    let reference_bits = |ids: &[u32]| -> f64 {
        reference_logprobs(&base, &cfg, ids).iter().map(|(lp, _, _)| -lp / std::f64::consts::LN_2).sum()
    };
    let with_bos: Vec<u32> = std::iter::once(1).chain(ids.iter().copied()).collect();
    let (want_bos, want_plain) = (reference_bits(&with_bos), reference_bits(&ids));
    assert!(want_bos > want_plain, "the first token costs bits when it is scored");
    let close = |got: f64, want: f64| (got - want).abs() <= 1e-3 * want;

    let (ctx, got, notes) = bits(&with, BosRule::Auto);
    assert_eq!(ctx.ids, vec![1]);
    assert_eq!(ctx.source, "tokenizer.json post-processor");
    assert!(close(got, want_bos), "{got} vs {want_bos}");
    assert!(!notes.contains("not scored"), "{notes}");

    let (ctx, got, notes) = bits(&without, BosRule::Auto);
    assert!(ctx.ids.is_empty());
    assert!(close(got, want_plain), "{got} vs {want_plain}");
    assert!(notes.contains("first token of each text has no context and is not scored"), "{notes}");

    // The flag overrides the tokenizer either way.
    assert!(close(bits(&with, BosRule::Never).1, want_plain));
    assert!(close(bits(&without, BosRule::Always).1, want_bos));
}
