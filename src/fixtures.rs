//! Deterministic generators of small adapter and base files with real-architecture key names.
//! `cargo run --example make-fixtures` writes them under `fixtures/`; tests call the same
//! builders to make their own variants.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;

use crate::error::{Error, Result};
pub use crate::load::write::SafetensorsBuilder;
pub use crate::rng::Rng;

impl SafetensorsBuilder {
    /// Record sd-scripts' `sshs_model_hash` (SHA-256 of the data section, which metadata
    /// does not change) as a trainer would.
    pub fn with_sshs_hash(&mut self) -> &mut Self {
        let bytes = self.to_bytes();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let h = crate::load::hashes::sha256_bytes(&bytes[8 + n..]);
        self.meta("sshs_model_hash", &h)
    }
}

/// A tiny llama: the key names and shape relations of Hugging Face `LlamaForCausalLM`.
#[derive(Debug, Clone, Copy)]
pub struct TinyLlama {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

impl Default for TinyLlama {
    fn default() -> Self {
        TinyLlama { vocab: 64, hidden: 16, intermediate: 32, layers: 2, heads: 4, kv_heads: 2 }
    }
}

impl TinyLlama {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
    /// (name, shape) of every weight, in a stable order.
    pub fn weights(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, kv) = (self.hidden, self.intermediate, self.kv_heads * self.head_dim());
        let mut w = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            w.push((format!("{p}.input_layernorm.weight"), vec![h]));
            w.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
            w.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            w.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            w.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
            w.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            w.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            w.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            w.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        w.push(("model.norm.weight".to_string(), vec![h]));
        w.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        w
    }
    pub fn config_json(&self) -> String {
        let v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": false,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
        });
        serde_json::to_string_pretty(&v).unwrap()
    }
    /// Random base weights (norms set to 1).
    pub fn base(&self, seed: u64) -> SafetensorsBuilder {
        self.base_scaled(seed, 0.3)
    }
    /// Random weights of standard deviation `scale` (norm weights 1).
    pub fn base_scaled(&self, seed: u64, scale: f64) -> SafetensorsBuilder {
        let mut rng = Rng::new(seed);
        let mut b = SafetensorsBuilder::new();
        for (name, shape) in self.weights() {
            if name.contains("norm") {
                b.add(&name, &shape, &vec![1.0; shape[0]], Dtype::F32);
            } else {
                b.random(&mut rng, &name, &shape, scale, Dtype::F32);
            }
        }
        b
    }
    pub fn write_hf_dir(&self, dir: &Path, seed: u64) -> Result<()> {
        self.write_hf_dir_scaled(dir, seed, 0.3)
    }
    /// A runnable model directory: config.json, model.safetensors and a character-level
    /// tokenizer.json ([`char_tokenizer`]).
    pub fn write_hf_dir_scaled(&self, dir: &Path, seed: u64, scale: f64) -> Result<()> {
        self.base_scaled(seed, scale).write(&dir.join("model.safetensors"))?;
        std::fs::write(dir.join("config.json"), self.config_json()).map_err(|e| Error::input(dir, e.to_string()))?;
        char_tokenizer()
            .save(dir.join("tokenizer.json"), true)
            .map_err(|e| Error::input(dir.join("tokenizer.json"), e.to_string()))
    }
}

/// Tokens of the tiny models: `<unk>`, `<s>`, `</s>`, then lower-case letters, digits and
/// punctuation in GPT-2's byte-level alphabet (space is `Ġ`, newline `Ċ`), then one merge,
/// `Ġt`. 50 tokens, so vocabularies of 64 hold them.
pub fn char_vocab() -> (Vec<String>, Vec<(String, String)>) {
    let mut v: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,;:'!?-".chars() {
        v.push(c.to_string());
    }
    v.push("Ġ".into());
    v.push("Ċ".into());
    v.push("Ġt".into());
    (v, vec![("Ġ".into(), "t".into())])
}

/// A byte-level BPE over [`char_vocab`]: unknown characters become `<unk>`.
pub fn char_tokenizer() -> tokenizers::Tokenizer {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let (tokens, merges) = char_vocab();
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).unk_token("<unk>".into()).build().expect("valid BPE");
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    // Llama's post-processor: `<s>` in front of every text, as tokenizer(text) gives it.
    let template = tokenizers::processors::template::TemplateProcessing::builder()
        .try_single("<s> $A")
        .expect("valid template")
        .special_tokens(vec![("<s>", 1)])
        .build()
        .expect("valid template");
    t.with_post_processor(Some(template));
    t
}

/// llama.cpp's `permute(w, n_head)` (convert_hf_to_gguf.py): HF row `h·d + s·d/2 + i` goes to
/// GGUF row `h·d + 2i + s`.
pub fn llama_cpp_permute(v: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let mut out = vec![0.0; v.len()];
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..d / 2 {
                let hf = h * d + s * (d / 2) + i;
                let gg = h * d + 2 * i + s;
                out[gg * cols..(gg + 1) * cols].copy_from_slice(&v[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    out
}

/// llama.cpp's name of a Hugging Face llama weight (`model.layers.3.mlp.up_proj.weight` →
/// `blk.3.ffn_up.weight`).
pub fn gguf_name(hf: &str) -> String {
    let stem = hf.strip_suffix(".weight").unwrap_or(hf);
    let g = match stem {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            let rest = stem.strip_prefix("model.layers.").expect("a layer weight");
            let (l, part) = rest.split_once('.').expect("layer.part");
            let gg = match part {
                "input_layernorm" => "attn_norm",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "post_attention_layernorm" => "ffn_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                other => panic!("no GGUF name for {other}"),
            };
            format!("blk.{l}.{gg}")
        }
    };
    format!("{g}.weight")
}

/// GGUF metadata of a llama shaped `cfg` with the character tokenizer ([`char_vocab`]).
fn llama_gguf_metadata(cfg: &TinyLlama, context: u32) -> Vec<(&'static str, candle_core::quantized::gguf_file::Value)> {
    use candle_core::quantized::gguf_file::Value;
    let (tokens, merges) = char_vocab();
    vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.attention.head_count", Value::U32(cfg.heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(cfg.kv_heads as u32)),
        ("llama.block_count", Value::U32(cfg.layers as u32)),
        ("llama.embedding_length", Value::U32(cfg.hidden as u32)),
        ("llama.feed_forward_length", Value::U32(cfg.intermediate as u32)),
        ("llama.context_length", Value::U32(context)),
        ("llama.rope.dimension_count", Value::U32(cfg.head_dim() as u32)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect())),
        (
            "tokenizer.ggml.merges",
            Value::Array(merges.iter().map(|(a, b)| Value::String(format!("{a} {b}"))).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ]
}

fn write_gguf(
    path: &Path,
    md: &[(&str, candle_core::quantized::gguf_file::Value)],
    tensors: &[(String, candle_core::quantized::QTensor)],
) -> Result<()> {
    let md_refs: Vec<_> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<_> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| Error::input(path, e.to_string()))?);
    candle_core::quantized::gguf_file::write(&mut f, &md_refs, &t_refs).map_err(|e| Error::input(path, e.to_string()))
}

/// Write a tiny llama as GGUF (f32 tensors, llama.cpp names and q/k permutation).
pub fn write_tiny_llama_gguf(cfg: &TinyLlama, seed: u64, path: &Path) -> Result<()> {
    write_llama_gguf(cfg, seed, candle_core::quantized::GgmlDType::F32, path)
}

/// Write the llama of [`TinyLlama::base`] as GGUF with its matrices in `dtype` (norms f32), as
/// llama.cpp's converter would: its names, q/k rows permuted.
pub fn write_llama_gguf(
    cfg: &TinyLlama,
    seed: u64,
    dtype: candle_core::quantized::GgmlDType,
    path: &Path,
) -> Result<()> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let base = cfg.base(seed);
    let bytes = base.to_bytes();
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("own bytes");
    let mut qtensors = vec![];
    for (name, shape) in cfg.weights() {
        let view = st.tensor(&name).expect("own tensor");
        let mut v: Vec<f32> = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        if name.ends_with("q_proj.weight") {
            v = llama_cpp_permute(&v, shape[0], shape[1], cfg.heads);
        } else if name.ends_with("k_proj.weight") {
            v = llama_cpp_permute(&v, shape[0], shape[1], cfg.kv_heads);
        }
        let t = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).map_err(|e| Error::Internal(e.to_string()))?;
        let d = if shape.len() == 1 { GgmlDType::F32 } else { dtype };
        let q = QTensor::quantize(&t, d).map_err(|e| Error::Internal(e.to_string()))?;
        qtensors.push((gguf_name(&name), q));
    }
    write_gguf(path, &llama_gguf_metadata(cfg, 256), &qtensors)
}

/// Write a llama shaped `cfg` with random weights (uniform in ±1/√in; norms 1)
/// as GGUF, matrices in `dtype`: for measuring memory and speed at 7–8B sizes without the real
/// model. Tensors are generated and quantised in parallel, one seeded stream each; the
/// quantised tensors are held until written (about the file's size).
pub fn write_random_llama_gguf(
    cfg: &TinyLlama,
    seed: u64,
    dtype: candle_core::quantized::GgmlDType,
    path: &Path,
) -> Result<()> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use rayon::prelude::*;
    let qtensors = cfg
        .weights()
        .into_par_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let (v, d) = if shape.len() == 1 {
                (vec![1f32; n], GgmlDType::F32)
            } else {
                let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                (rng.values(n, 1.0 / (shape[1] as f64).sqrt()), dtype)
            };
            let t = Tensor::from_vec(v, shape.as_slice(), &Device::Cpu).map_err(|e| Error::Internal(e.to_string()))?;
            let q = QTensor::quantize(&t, d).map_err(|e| Error::Internal(e.to_string()))?;
            Ok((gguf_name(&name), q))
        })
        .collect::<Result<Vec<_>>>()?;
    write_gguf(path, &llama_gguf_metadata(cfg, 4096), &qtensors)
}

/// Weights of a cut-down SD1.x-style checkpoint in original-LDM naming (UNet under
/// `model.diffusion_model.`, CLIP text encoder under `cond_stage_model.transformer.`).
/// Channel counts are tiny; the key names and the conv/linear layouts are the real ones.
pub fn sd_tiny_base_weights() -> Vec<(String, Vec<usize>)> {
    let u = "model.diffusion_model";
    let te = "cond_stage_model.transformer.text_model.encoder.layers";
    let mut w: Vec<(String, Vec<usize>)> = vec![(format!("{u}.input_blocks.0.0.weight"), vec![8, 4, 3, 3])];
    // input_blocks.1: resnet + attention at level 0 (8 channels); input_blocks.4: level 1 (16).
    for (blk, c) in [(1usize, 8usize), (4, 16)] {
        let cin = 8;
        w.push((format!("{u}.input_blocks.{blk}.0.in_layers.2.weight"), vec![c, cin, 3, 3]));
        w.push((format!("{u}.input_blocks.{blk}.0.out_layers.3.weight"), vec![c, c, 3, 3]));
        w.push((format!("{u}.input_blocks.{blk}.0.emb_layers.1.weight"), vec![c, 32]));
        if cin != c {
            w.push((format!("{u}.input_blocks.{blk}.0.skip_connection.weight"), vec![c, cin, 1, 1]));
        }
        let a = format!("{u}.input_blocks.{blk}.1");
        w.push((format!("{a}.proj_in.weight"), vec![c, c, 1, 1]));
        for p in ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"] {
            w.push((format!("{a}.transformer_blocks.0.{p}.weight"), vec![c, c]));
        }
        w.push((format!("{a}.transformer_blocks.0.attn2.to_k.weight"), vec![c, 12]));
        w.push((format!("{a}.transformer_blocks.0.attn2.to_v.weight"), vec![c, 12]));
        w.push((format!("{a}.transformer_blocks.0.ff.net.0.proj.weight"), vec![4 * c, c]));
        w.push((format!("{a}.transformer_blocks.0.ff.net.2.weight"), vec![c, 2 * c]));
        w.push((format!("{a}.proj_out.weight"), vec![c, c, 1, 1]));
    }
    w.push((format!("{u}.input_blocks.3.0.op.weight"), vec![8, 8, 3, 3]));
    w.push((format!("{u}.middle_block.1.proj_out.weight"), vec![16, 16, 1, 1]));
    w.push((format!("{u}.output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight"), vec![16, 12]));
    for l in 0..2 {
        for p in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"] {
            w.push((format!("{te}.{l}.{p}.weight"), vec![12, 12]));
        }
        w.push((format!("{te}.{l}.mlp.fc1.weight"), vec![24, 12]));
        w.push((format!("{te}.{l}.mlp.fc2.weight"), vec![12, 24]));
    }
    w
}

pub fn sd_tiny_base(seed: u64) -> SafetensorsBuilder {
    let mut rng = Rng::new(seed);
    let mut b = SafetensorsBuilder::new();
    for (name, shape) in sd_tiny_base_weights() {
        b.random(&mut rng, &name, &shape, 0.2, Dtype::F32);
    }
    b
}

/// kohya LoRA/LoCon on the SD base: diffusers-path names for SD1.x, one SGM-path name as SDXL
/// trainers write, a module without `.alpha`, a Tucker (`lora_mid`) conv, text-encoder
/// modules, sd-scripts metadata and a correct `sshs_model_hash`.
pub fn kohya_sd_lora(seed: u64) -> SafetensorsBuilder {
    let mut rng = Rng::new(seed);
    let mut b = SafetensorsBuilder::new();
    let d = Dtype::F16;
    let r = 4;
    let lin = |b: &mut SafetensorsBuilder, rng: &mut Rng, name: &str, out: usize, inp: usize, alpha: Option<f32>| {
        b.random(rng, &format!("{name}.lora_down.weight"), &[r, inp], 0.5, d);
        b.random(rng, &format!("{name}.lora_up.weight"), &[out, r], 0.5, d);
        if let Some(a) = alpha {
            b.add(&format!("{name}.alpha"), &[], &[a], Dtype::F32);
        }
    };
    let at = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0";
    lin(&mut b, &mut rng, &format!("{at}_attn1_to_q"), 8, 8, Some(2.0));
    lin(&mut b, &mut rng, &format!("{at}_attn1_to_k"), 8, 8, Some(2.0));
    lin(&mut b, &mut rng, &format!("{at}_attn2_to_k"), 8, 12, Some(2.0));
    lin(&mut b, &mut rng, &format!("{at}_ff_net_0_proj"), 32, 8, None);
    lin(&mut b, &mut rng, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 16, 16, Some(1.0));
    lin(&mut b, &mut rng, "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v", 16, 12, Some(4.0));
    lin(&mut b, &mut rng, "lora_te_text_model_encoder_layers_0_self_attn_q_proj", 12, 12, Some(2.0));
    lin(&mut b, &mut rng, "lora_te_text_model_encoder_layers_1_mlp_fc1", 24, 12, Some(2.0));
    // LoCon on a 3x3 resnet conv: down [r, in, 3, 3], up [out, r, 1, 1].
    let c = "lora_unet_down_blocks_0_resnets_0_conv1";
    b.random(&mut rng, &format!("{c}.lora_down.weight"), &[r, 8, 3, 3], 0.5, d);
    b.random(&mut rng, &format!("{c}.lora_up.weight"), &[8, r, 1, 1], 0.5, d);
    b.add(&format!("{c}.alpha"), &[], &[1.0], Dtype::F32);
    // Tucker LoCon (lora_mid) on the 1x1 proj_in conv of level 1... and a 3x3 conv2.
    let t = "lora_unet_down_blocks_1_resnets_0_conv2";
    b.random(&mut rng, &format!("{t}.lora_down.weight"), &[r, 16, 1, 1], 0.5, d);
    b.random(&mut rng, &format!("{t}.lora_mid.weight"), &[r, r, 3, 3], 0.5, d);
    b.random(&mut rng, &format!("{t}.lora_up.weight"), &[16, r, 1, 1], 0.5, d);
    b.add(&format!("{t}.alpha"), &[], &[2.0], Dtype::F32);
    b.meta("ss_network_module", "networks.lora")
        .meta("ss_network_dim", "4")
        .meta("ss_network_alpha", "2.0")
        .meta("ss_sd_model_name", "v1-5-pruned-emaonly.safetensors")
        .meta("ss_base_model_version", "sd_v1")
        .meta("ss_output_name", "demo_style")
        .meta("ss_num_train_images", "20")
        .meta("ss_num_epochs", "50")
        .meta("ss_max_train_steps", "5000")
        .meta("ss_resolution", "(512, 512)")
        .meta("ss_dataset_dirs", r#"{"10_demo_artist": {"n_repeats": 10, "img_count": 20}}"#)
        .meta(
            "ss_tag_frequency",
            r#"{"10_demo_artist": {"demo_artist": 20, "1girl": 14, "watercolor": 17, "landscape": 6, " flowers": 3}}"#,
        );
    b.with_sshs_hash();
    b
}

/// LyCORIS LoHa: a linear module and a Tucker conv module (hada_t1/t2).
pub fn lycoris_loha(seed: u64) -> SafetensorsBuilder {
    let mut rng = Rng::new(seed);
    let mut b = SafetensorsBuilder::new();
    let d = Dtype::F32;
    let r = 3;
    let n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v";
    for w in ["w1", "w2"] {
        b.random(&mut rng, &format!("{n}.hada_{w}_a"), &[8, r], 0.5, d);
        b.random(&mut rng, &format!("{n}.hada_{w}_b"), &[r, 8], 0.5, d);
    }
    b.add(&format!("{n}.alpha"), &[], &[1.5], Dtype::F32);
    let c = "lora_unet_down_blocks_0_resnets_0_conv2";
    for w in ["1", "2"] {
        b.random(&mut rng, &format!("{c}.hada_w{w}_a"), &[r, 8], 0.5, d);
        b.random(&mut rng, &format!("{c}.hada_w{w}_b"), &[r, 8], 0.5, d);
        b.random(&mut rng, &format!("{c}.hada_t{w}"), &[r, r, 3, 3], 0.5, d);
    }
    b.add(&format!("{c}.alpha"), &[], &[3.0], Dtype::F32);
    b.meta("ss_network_module", "lycoris.kohya").meta("ss_network_args", r#"{"algo": "loha", "conv_dim": "3"}"#);
    b
}

/// LyCORIS LoKr: w1 whole with w2 decomposed; both whole (scale 1); a Tucker conv w2.
pub fn lycoris_lokr(seed: u64) -> SafetensorsBuilder {
    let mut rng = Rng::new(seed);
    let mut b = SafetensorsBuilder::new();
    let d = Dtype::BF16;
    // to_q 8x8 = kron([2,2], [4,4]); w2 = w2_a [4,2] · w2_b [2,4].
    let n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    b.random(&mut rng, &format!("{n}.lokr_w1"), &[2, 2], 0.5, d);
    b.random(&mut rng, &format!("{n}.lokr_w2_a"), &[4, 2], 0.5, d);
    b.random(&mut rng, &format!("{n}.lokr_w2_b"), &[2, 4], 0.5, d);
    b.add(&format!("{n}.alpha"), &[], &[1.0], Dtype::F32);
    // ff.net.0.proj 32x8 = kron([4,2], [8,4]), both whole: scale 1 whatever alpha says.
    let f = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj";
    b.random(&mut rng, &format!("{f}.lokr_w1"), &[4, 2], 0.5, d);
    b.random(&mut rng, &format!("{f}.lokr_w2"), &[8, 4], 0.5, d);
    b.add(&format!("{f}.alpha"), &[], &[7.0], Dtype::F32);
    // conv1 [8, 8, 3, 3] = kron(w1 [2,2], w2 [4,4,3,3]) with w2 Tucker: t2 [r,r,3,3], w2_a [r,4], w2_b [r,4].
    let c = "lora_unet_down_blocks_0_resnets_0_conv1";
    b.random(&mut rng, &format!("{c}.lokr_w1_a"), &[2, 2], 0.5, d);
    b.random(&mut rng, &format!("{c}.lokr_w1_b"), &[2, 2], 0.5, d);
    b.random(&mut rng, &format!("{c}.lokr_t2"), &[2, 2, 3, 3], 0.5, d);
    b.random(&mut rng, &format!("{c}.lokr_w2_a"), &[2, 4], 0.5, d);
    b.random(&mut rng, &format!("{c}.lokr_w2_b"), &[2, 4], 0.5, d);
    b.add(&format!("{c}.alpha"), &[], &[1.0], Dtype::F32);
    b
}

/// LyCORIS `full` (`.diff`, `.diff_b`), a kohya DoRA module (`dora_scale`), and (IA)³.
pub fn lycoris_full_dora_ia3(seed: u64) -> SafetensorsBuilder {
    let mut rng = Rng::new(seed);
    let mut b = SafetensorsBuilder::new();
    let d = Dtype::F32;
    let f = "lora_te_text_model_encoder_layers_0_self_attn_out_proj";
    b.random(&mut rng, &format!("{f}.diff"), &[12, 12], 0.05, d);
    b.random(&mut rng, &format!("{f}.diff_b"), &[12], 0.05, d);
    let n = "lora_te_text_model_encoder_layers_1_self_attn_k_proj";
    b.random(&mut rng, &format!("{n}.lora_down.weight"), &[2, 12], 0.5, d);
    b.random(&mut rng, &format!("{n}.lora_up.weight"), &[12, 2], 0.5, d);
    b.add(&format!("{n}.alpha"), &[], &[1.0], Dtype::F32);
    let m: Vec<f32> = (0..12).map(|i| 0.5 + 0.05 * i as f32).collect();
    b.add(&format!("{n}.dora_scale"), &[12, 1], &m, d);
    let i = "lora_te_text_model_encoder_layers_1_mlp_fc2";
    b.random(&mut rng, &format!("{i}.weight"), &[24], 0.2, d);
    b.add(&format!("{i}.on_input"), &[], &[1.0], Dtype::F32);
    b
}

/// diffusers LoRA: PEFT-style `lora_A/B` under `unet.`, legacy processor keys, legacy
/// text-encoder `lora_linear_layer`, and the alpha in `lora_adapter_metadata`.
pub fn diffusers_lora(seed: u64) -> SafetensorsBuilder {
    let mut rng = Rng::new(seed);
    let mut b = SafetensorsBuilder::new();
    let d = Dtype::F32;
    let a = "unet.down_blocks.0.attentions.0.transformer_blocks.0";
    b.random(&mut rng, &format!("{a}.attn1.to_k.lora_A.weight"), &[4, 8], 0.5, d);
    b.random(&mut rng, &format!("{a}.attn1.to_k.lora_B.weight"), &[8, 4], 0.5, d);
    b.random(&mut rng, &format!("{a}.attn1.processor.to_out_lora.down.weight"), &[4, 8], 0.5, d);
    b.random(&mut rng, &format!("{a}.attn1.processor.to_out_lora.up.weight"), &[8, 4], 0.5, d);
    let t = "text_encoder.text_model.encoder.layers.1.self_attn.v_proj";
    b.random(&mut rng, &format!("{t}.lora_linear_layer.down.weight"), &[4, 12], 0.5, d);
    b.random(&mut rng, &format!("{t}.lora_linear_layer.up.weight"), &[12, 4], 0.5, d);
    b.meta(
        "lora_adapter_metadata",
        r#"{"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": ["to_k", "to_out.0"], "text_encoder.r": 4, "text_encoder.lora_alpha": 2}"#,
    );
    b
}

/// PEFT adapter for `TinyLlama`: rank and alpha patterns, an embedding LoRA, and a
/// `modules_to_save` replacement. Returns the weights and the `adapter_config.json` text.
pub fn peft_llama(cfg: &TinyLlama, seed: u64, dora: bool) -> (SafetensorsBuilder, String) {
    let mut rng = Rng::new(seed);
    let mut b = SafetensorsBuilder::new();
    let d = Dtype::BF16;
    let h = cfg.hidden;
    let kv = cfg.kv_heads * cfg.head_dim();
    for l in 0..cfg.layers {
        let p = format!("base_model.model.model.layers.{l}.self_attn");
        // v_proj uses rank 2 through rank_pattern; q_proj rank 4.
        for (proj, out, r) in [("q_proj", h, 4), ("v_proj", kv, 2)] {
            b.random(&mut rng, &format!("{p}.{proj}.lora_A.weight"), &[r, h], 0.5, d);
            b.random(&mut rng, &format!("{p}.{proj}.lora_B.weight"), &[out, r], 0.5, d);
            if dora {
                let m: Vec<f32> = (0..out).map(|i| 1.0 + 0.01 * i as f32).collect();
                b.add(&format!("{p}.{proj}.lora_magnitude_vector"), &[out], &m, d);
            }
        }
    }
    if !dora {
        b.random(&mut rng, "base_model.model.model.embed_tokens.lora_embedding_A", &[4, cfg.vocab], 0.5, d);
        b.random(&mut rng, "base_model.model.model.embed_tokens.lora_embedding_B", &[h, 4], 0.5, d);
        b.random(&mut rng, "base_model.model.lm_head.weight", &[cfg.vocab, h], 0.3, d);
    }
    let config = serde_json::json!({
        "peft_type": "LORA",
        "base_model_name_or_path": "fixtures/llama-tiny",
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": dora,
        "use_dora": dora,
        "rank_pattern": {"v_proj": 2},
        "alpha_pattern": {"layers.1.self_attn.q_proj": 16},
        "target_modules": if dora { serde_json::json!(["q_proj", "v_proj"]) } else { serde_json::json!(["q_proj", "v_proj", "embed_tokens"]) },
        "modules_to_save": if dora { serde_json::json!(null) } else { serde_json::json!(["lm_head"]) },
        "fan_in_fan_out": false,
        "task_type": "CAUSAL_LM",
    });
    (b, serde_json::to_string_pretty(&config).unwrap())
}

/// Write every shipped fixture under `dir`.
pub fn write_all(dir: &Path) -> Result<()> {
    let llama = TinyLlama::default();
    llama.write_hf_dir(&dir.join("llama-tiny"), 1)?;
    write_tiny_llama_gguf(&llama, 1, &dir.join("llama-tiny.gguf"))?;
    for (name, dora) in [("peft-llama", false), ("peft-dora-llama", true)] {
        let (w, c) = peft_llama(&llama, 2, dora);
        w.write(&dir.join(name).join("adapter_model.safetensors"))?;
        std::fs::write(dir.join(name).join("adapter_config.json"), c).map_err(|e| Error::input(dir, e.to_string()))?;
    }
    sd_tiny_base(3).write(&dir.join("sd-tiny-base.safetensors"))?;
    kohya_sd_lora(4).write(&dir.join("kohya-sd-lora.safetensors"))?;
    lycoris_loha(5).write(&dir.join("lycoris-loha.safetensors"))?;
    lycoris_lokr(6).write(&dir.join("lycoris-lokr.safetensors"))?;
    lycoris_full_dora_ia3(7).write(&dir.join("lycoris-full-dora-ia3.safetensors"))?;
    diffusers_lora(8).write(&dir.join("diffusers-lora.safetensors"))?;
    Ok(())
}

/// Tensors of an SD pipeline by runtime name: shape and values.
pub type SdWeights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// A diffusers Stable Diffusion pipeline described by its config files, for tests of the image
/// runtime: the micro SD-1.x shape of fixtures/sd-micro (UNet 32/64 with one cross-attention
/// level, VAE 16/32/32, CLIP width 32 with 2 layers of 4 heads, 16 positions).
#[derive(Debug, Clone)]
pub struct SdPipelineSpec {
    pub unet: serde_json::Value,
    pub vae: serde_json::Value,
    pub text_encoder: serde_json::Value,
    pub scheduler: serde_json::Value,
    pub vocab: BTreeMap<String, u32>,
    pub merges: Vec<(String, String)>,
}

/// GPT-2/CLIP's byte ↔ printable character table (`bytes_to_unicode`).
pub fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![' '; 256];
    for (b, c) in bs.iter().zip(cs) {
        table[*b as usize] = char::from_u32(c).expect("valid");
    }
    table
}

impl SdPipelineSpec {
    pub fn micro() -> Self {
        let chars = bytes_to_unicode();
        let mut vocab = BTreeMap::new();
        let add = |t: String, vocab: &mut BTreeMap<String, u32>| {
            let n = vocab.len() as u32;
            vocab.entry(t).or_insert(n);
        };
        for c in &chars {
            add(c.to_string(), &mut vocab);
        }
        for c in &chars {
            add(format!("{c}</w>"), &mut vocab);
        }
        let merges: Vec<(String, String)> =
            [("t", "h"), ("th", "e</w>"), ("a", "r"), ("ar", "t</w>"), ("c", "a"), ("ca", "t</w>")]
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
        for (a, b) in &merges {
            add(format!("{a}{b}"), &mut vocab);
        }
        add("<|startoftext|>".into(), &mut vocab);
        add("<|endoftext|>".into(), &mut vocab);
        let v = vocab.len();
        SdPipelineSpec {
            unet: serde_json::json!({
                "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 4, "out_channels": 4,
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
                "cross_attention_dim": 32, "attention_head_dim": 8, "use_linear_projection": false,
                "addition_embed_type": null, "flip_sin_to_cos": true, "freq_shift": 0
            }),
            vae: serde_json::json!({
                "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
                "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
                "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
                "block_out_channels": [16, 32, 32], "layers_per_block": 1, "latent_channels": 4,
                "norm_num_groups": 8, "sample_size": 32, "scaling_factor": 0.18215
            }),
            text_encoder: serde_json::json!({
                "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": v,
                "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "max_position_embeddings": 16, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
            }),
            scheduler: serde_json::json!({
                "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                "steps_offset": 1, "clip_sample": false, "set_alpha_to_one": false
            }),
            vocab,
            merges,
        }
    }

    /// Random weights under the runtime's names (`unet.…`, `vae.…`, `text_encoder.text_model.…`):
    /// norm scales near 1, other weights uniform with scale 1/√fan-in, biases small.
    pub fn random_weights(&self, seed: u64) -> Result<SdWeights> {
        let mut rng = Rng::new(seed);
        let mut out = BTreeMap::new();
        for (name, shape) in crate::model::sd::parameter_shapes(&self.unet, &self.vae, &self.text_encoder)? {
            let n: usize = shape.iter().product();
            let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
            let is_norm = name.contains("norm") && shape.len() == 1;
            let v: Vec<f32> = if is_norm && name.ends_with(".weight") {
                (0..n).map(|_| 1.0 + 0.1 * rng.uniform() as f32).collect()
            } else if name.ends_with(".bias") || is_norm {
                (0..n).map(|_| 0.05 * rng.uniform() as f32).collect()
            } else if name.contains("embedding") {
                (0..n).map(|_| 0.5 * rng.uniform() as f32).collect()
            } else {
                (0..n).map(|_| (rng.uniform() / (fan_in as f64).sqrt()) as f32).collect()
            };
            out.insert(name, (shape, v));
        }
        Ok(out)
    }

    /// Write the pipeline directory with `weights` (runtime names, as `random_weights` gives).
    pub fn write(&self, dir: &Path, weights: &SdWeights) -> Result<()> {
        let io = |e: std::io::Error| Error::input(dir, e.to_string());
        let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("JSON");
        for d in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            std::fs::create_dir_all(dir.join(d)).map_err(io)?;
        }
        let index = serde_json::json!({"_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDPMScheduler"]});
        std::fs::write(dir.join("model_index.json"), json(&index)).map_err(io)?;
        std::fs::write(dir.join("unet/config.json"), json(&self.unet)).map_err(io)?;
        std::fs::write(dir.join("vae/config.json"), json(&self.vae)).map_err(io)?;
        std::fs::write(dir.join("text_encoder/config.json"), json(&self.text_encoder)).map_err(io)?;
        std::fs::write(dir.join("scheduler/scheduler_config.json"), json(&self.scheduler)).map_err(io)?;
        std::fs::write(dir.join("tokenizer/vocab.json"), serde_json::to_string(&self.vocab).expect("JSON"))
            .map_err(io)?;
        let mut merges = "#version: 0.2\n".to_string();
        for (a, b) in &self.merges {
            merges += &format!("{a} {b}\n");
        }
        std::fs::write(dir.join("tokenizer/merges.txt"), merges).map_err(io)?;
        let special = serde_json::json!({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 16});
        std::fs::write(dir.join("tokenizer/tokenizer_config.json"), json(&special)).map_err(io)?;
        for (prefix, file) in [
            ("unet.", "unet/diffusion_pytorch_model.safetensors"),
            ("vae.", "vae/diffusion_pytorch_model.safetensors"),
            ("text_encoder.", "text_encoder/model.safetensors"),
        ] {
            let mut b = SafetensorsBuilder::new();
            for (k, (shape, v)) in weights.iter().filter(|(k, _)| k.starts_with(prefix)) {
                b.add(&k[prefix.len()..], shape, v, Dtype::F32);
            }
            b.write(&dir.join(file))?;
        }
        Ok(())
    }
}
