//! Fitting a LoRA to a set of texts with candle's autograd: the positive control ("would the
//! probe catch an adapter that memorised these?") and the adapters the tests plant. The result
//! is a PEFT directory, read back through the same loader as any published adapter.

use std::path::Path;

use candle_core::{DType, Tensor, Var, D};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

use super::llama::{ids_tensor, LoraPair, PROJECTIONS};
use super::{cerr, TextModel};
use crate::error::{Error, Result};
use crate::load::write::SafetensorsBuilder;
use crate::rng::Rng;

#[derive(Debug, Clone, serde::Serialize)]
pub struct FitOptions {
    pub rank: usize,
    pub alpha: f64,
    /// Module names (`q_proj`, `v_proj`, `gate_proj`…).
    pub targets: Vec<String>,
    /// Layers to adapt; `None` = all.
    pub layers: Option<Vec<usize>>,
    pub max_steps: usize,
    pub lr: f64,
    pub seed: u64,
    /// Stop once the mean loss (nats/token) is below this and every token with at least
    /// [`WARMUP`] tokens of context is the model's top prediction: then greedy decoding from
    /// a prefix of that length reproduces the rest.
    pub target_loss: f64,
    /// Also train on each text from every multiple of this many tokens (each such suffix
    /// after the start token), as packed training data presents a text from arbitrary points;
    /// 0 = whole texts only.
    pub chunk_stride: usize,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            rank: 8,
            alpha: 16.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                .map(String::from)
                .to_vec(),
            layers: None,
            max_steps: 300,
            lr: 1e-2,
            seed: 0,
            target_loss: 0.05,
            chunk_stride: 50,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FitReport {
    pub steps: usize,
    pub final_loss: f64,
    pub final_accuracy: f64,
    pub memorised: bool,
    pub tokens: usize,
    pub params: usize,
}

/// Context (tokens, start token included) before a prediction counts towards accuracy.
pub const WARMUP: usize = 8;

struct Slot {
    key: String,
    a: Var,
    b: Var,
}

/// Train LoRA factors on `texts` (each fed from the model's BOS) and return the adapter as
/// PEFT tensors + `adapter_config.json`, with a report. `progress(step, loss)` after each step.
pub fn fit_lora(
    model: &TextModel,
    texts: &[String],
    opts: &FitOptions,
    progress: &dyn Fn(usize, f64),
) -> Result<(SafetensorsBuilder, String, FitReport)> {
    if texts.is_empty() {
        return Err(Error::Usage("fit-lora needs at least one text".into()));
    }
    if opts.rank == 0 {
        return Err(Error::Usage("--rank must be at least 1".into()));
    }
    let ctx = model.llama.cfg.context();
    let bos: Vec<u32> = model.llama.cfg.bos_token_id.into_iter().collect();
    let mut seqs: Vec<Vec<u32>> = vec![];
    for t in texts {
        let ids = model.tokenizer.encode(t)?;
        if ids.len() < 2 {
            return Err(Error::Usage("every text must give at least two tokens to learn".into()));
        }
        let step = if opts.chunk_stride == 0 { ids.len() } else { opts.chunk_stride };
        for o in (0..ids.len() - 1).step_by(step) {
            let mut s: Vec<u32> = bos.iter().chain(&ids[o..]).copied().collect();
            s.truncate(ctx);
            seqs.push(s);
        }
    }
    let mut net = model.llama.clone();
    let mut rng = Rng::new(opts.seed);
    let mut slots = vec![];
    let layers: Vec<usize> = opts.layers.clone().unwrap_or_else(|| (0..net.cfg.num_hidden_layers).collect());
    let scale = opts.alpha / opts.rank as f64;
    let dev = net.device().clone();
    for &l in &layers {
        if l >= net.cfg.num_hidden_layers {
            return Err(Error::Usage(format!("the model has no layer {l}")));
        }
        for full in PROJECTIONS {
            let short = full.rsplit('.').next().unwrap_or(full);
            if !opts.targets.iter().any(|t| t == short) {
                continue;
            }
            let key = format!("model.layers.{l}.{full}");
            let linear = net.linear_mut(&key).expect("every layer has every projection");
            if matches!(linear.weight(), crate::model::Weight::Quant(_)) {
                // candle's quantised matmul has no backward pass: gradients would stop there.
                return Err(Error::Usage(
                    "fit-lora trains on f32 weights: load the base with Precision::F32, not its quantised blocks"
                        .into(),
                ));
            }
            let (out, inp) = linear.weight().dims().map_err(cerr)?;
            // PEFT's init: A ~ kaiming-uniform(a=√5) = U(±1/√in), B = 0 (so training starts at the base).
            let bound = 1.0 / (inp as f64).sqrt();
            let a_vals: Vec<f32> = (0..opts.rank * inp).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a_vals, (opts.rank, inp), &dev).map_err(cerr)?).map_err(cerr)?;
            let b = Var::zeros((out, opts.rank), DType::F32, &dev).map_err(cerr)?;
            linear.set_lora(LoraPair { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale });
            slots.push(Slot { key, a, b });
        }
    }
    if slots.is_empty() {
        return Err(Error::Usage(format!("no module matches --targets {:?}", opts.targets)));
    }
    let vars: Vec<Var> = slots.iter().flat_map(|s| [s.a.clone(), s.b.clone()]).collect();
    let params = slots.iter().map(|s| s.a.elem_count() + s.b.elem_count()).sum();
    let mut opt =
        AdamW::new(vars, ParamsAdamW { lr: opts.lr, weight_decay: 0.0, ..Default::default() }).map_err(cerr)?;

    // Inputs right-padded; the loss only looks at real positions.
    let t = seqs.iter().map(Vec::len).max().unwrap_or(0) - 1;
    let inputs: Vec<Vec<u32>> = seqs.iter().map(|s| pad(&s[..s.len() - 1], t)).collect();
    let mut positions = vec![];
    let mut targets = vec![];
    // Early predictions of an example see too little to tell the texts (or the chunks of one
    // text) apart, so accuracy counts positions with at least WARMUP tokens of context.
    let mut counted = vec![];
    for (r, s) in seqs.iter().enumerate() {
        for p in 0..s.len() - 1 {
            positions.push((r * t + p) as u32);
            targets.push(s[p + 1]);
            counted.push(if p < WARMUP { 0f32 } else { 1.0 });
        }
    }
    let n_counted: f32 = counted.iter().sum::<f32>().max(1.0);
    let ids = ids_tensor(&inputs, &dev).map_err(cerr)?;
    let pos = Tensor::new(positions.as_slice(), &dev).map_err(cerr)?;
    let tgt = Tensor::new(targets.as_slice(), &dev).map_err(cerr)?;
    let counted = Tensor::new(counted.as_slice(), &dev).map_err(cerr)?;
    let h = net.cfg.hidden_size;
    let mut report = FitReport {
        steps: 0,
        final_loss: f64::NAN,
        final_accuracy: 0.0,
        memorised: false,
        tokens: targets.len(),
        params,
    };
    for step in 1..=opts.max_steps {
        let step_res = (|| -> candle_core::Result<(f64, f64)> {
            let hidden = net.hidden(&ids, None, true)?.reshape(((), h))?.index_select(&pos, 0)?;
            let logits = net.logits(&hidden)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &tgt)?;
            let hits = logits.argmax(D::Minus1)?.eq(&tgt)?.to_dtype(DType::F32)?;
            let acc = (hits * &counted)?.sum_all()?.to_scalar::<f32>()? / n_counted;
            let l = loss.to_scalar::<f32>()? as f64;
            opt.backward_step(&loss)?;
            Ok((l, acc as f64))
        })();
        let (loss, acc) = step_res.map_err(cerr)?;
        if !loss.is_finite() {
            return Err(Error::Numeric(format!("training diverged at step {step} (loss {loss}); lower --lr")));
        }
        report.steps = step;
        report.final_loss = loss;
        report.final_accuracy = acc;
        progress(step, loss);
        // The loss and accuracy are of the weights before this step's update, which is applied
        // all the same: the saved adapter is one update past the state that met the criterion.
        if loss < opts.target_loss && acc >= 1.0 {
            report.memorised = true;
            break;
        }
    }
    let (st, cfg) = to_peft(&slots, opts, &model.tokenizer.source)?;
    Ok((st, cfg, report))
}

fn pad(s: &[u32], len: usize) -> Vec<u32> {
    let mut v = s.to_vec();
    v.resize(len, 0);
    v
}

fn to_peft(slots: &[Slot], opts: &FitOptions, base: &Path) -> Result<(SafetensorsBuilder, String)> {
    let mut st = SafetensorsBuilder::new();
    st.meta("format", "pt");
    for s in slots {
        for (suffix, v) in [("lora_A", &s.a), ("lora_B", &s.b)] {
            let vals = v.flatten_all().and_then(|x| x.to_vec1::<f32>()).map_err(cerr)?;
            st.add(&format!("base_model.model.{}.{suffix}.weight", s.key), v.dims(), &vals, safetensors::Dtype::F32);
        }
    }
    let cfg = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.display().to_string(),
        "r": opts.rank,
        "lora_alpha": opts.alpha,
        "lora_dropout": 0.0,
        "target_modules": opts.targets,
        "layers_to_transform": opts.layers,
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "bias": "none",
    });
    Ok((st, serde_json::to_string_pretty(&cfg).expect("json")))
}

/// Write a PEFT adapter directory (`adapter_model.safetensors`, `adapter_config.json`).
pub fn write_peft_dir(dir: &Path, st: &SafetensorsBuilder, config: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::input(dir, format!("cannot create directory: {e}")))?;
    st.write(&dir.join("adapter_model.safetensors"))?;
    let p = dir.join("adapter_config.json");
    std::fs::write(&p, config).map_err(|e| Error::input(&p, format!("cannot write: {e}")))
}
