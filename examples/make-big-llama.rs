//! Writes a llama-shaped base with random weights at a size people dispute (Llama-2-7B shape by
//! default), a rank-16 PEFT LoRA on every linear layer, and two works of 300 characters, for
//! measuring the text probe's memory and speed (docs/benchmarks.md, issue #13). Not committed:
//! scripts/make-big-llama.sh runs it.
//!
//!   cargo run --release --example make-big-llama -- OUT_DIR [q4_0|q8_0|q4k|q6k|bf16|f16] [7b|1b|tiny]
//!
//! GGUF types write OUT_DIR/base-<type>.gguf; bf16/f16 write a Hugging Face directory OUT_DIR/base-<type>
//! (config.json, tokenizer.json, one model.safetensors streamed tensor by tensor, so writing it
//! never holds the model). The tokenizer is lorascope's character tokenizer: a 300-character work
//! is about 300 tokens.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use lorascope::fixtures::{char_tokenizer, write_random_llama_gguf, Rng, SafetensorsBuilder, TinyLlama};
use rayon::prelude::*;

fn shape(name: &str) -> TinyLlama {
    match name {
        // Llama-2-7B / Mistral-7B without GQA: 6.7B parameters.
        "7b" => TinyLlama { vocab: 32000, hidden: 4096, intermediate: 11008, layers: 32, heads: 32, kv_heads: 32 },
        "1b" => TinyLlama { vocab: 32000, hidden: 2048, intermediate: 5632, layers: 22, heads: 32, kv_heads: 4 },
        "tiny" => TinyLlama { vocab: 64, hidden: 256, intermediate: 512, layers: 2, heads: 4, kv_heads: 2 },
        other => panic!("unknown shape {other}: 7b, 1b or tiny"),
    }
}

/// One model.safetensors of 16-bit random weights, written tensor by tensor after its header.
fn write_half_safetensors(cfg: &TinyLlama, seed: u64, bf16: bool, path: &Path) {
    let weights = cfg.weights();
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &weights {
        let bytes = 2 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": if bf16 { "BF16" } else { "F16" }, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    for (i, (name, shape)) in weights.iter().enumerate() {
        let n: usize = shape.iter().product();
        let scale = if shape.len() == 1 { 0.0 } else { 1.0 / (shape[1] as f64).sqrt() };
        // Generated in parallel in 1 Mi-value pieces, each its own seeded stream.
        let piece = 1 << 20;
        let bytes: Vec<u8> = (0..n.div_ceil(piece))
            .into_par_iter()
            .flat_map_iter(|p| {
                let mut rng = Rng::new(seed ^ ((i as u64) << 32) ^ p as u64);
                let len = piece.min(n - p * piece);
                (0..len)
                    .flat_map(|_| {
                        let v = if scale == 0.0 { 1.0 } else { (rng.uniform() * scale) as f32 };
                        if bf16 {
                            half::bf16::from_f32(v).to_le_bytes()
                        } else {
                            half::f16::from_f32(v).to_le_bytes()
                        }
                    })
                    .collect::<Vec<u8>>()
            })
            .collect();
        f.write_all(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    f.flush().unwrap();
}

/// A PEFT LoRA of rank 16 on every projection of every layer (f32, B non-zero).
fn write_adapter(cfg: &TinyLlama, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng::new(7);
    let mut b = SafetensorsBuilder::new();
    let r = 16;
    for (name, shape) in cfg.weights().iter().filter(|(n, s)| s.len() == 2 && n.starts_with("model.layers.")) {
        let stem = name.strip_suffix(".weight").unwrap();
        let (out, inp) = (shape[0], shape[1]);
        b.random(
            &mut rng,
            &format!("base_model.model.{stem}.lora_A.weight"),
            &[r, inp],
            1.0 / (inp as f64).sqrt(),
            safetensors::Dtype::F32,
        );
        b.random(&mut rng, &format!("base_model.model.{stem}.lora_B.weight"), &[out, r], 0.02, safetensors::Dtype::F32);
    }
    b.write(&dir.join("adapter_model.safetensors")).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": r, "lora_alpha": 32, "task_type": "CAUSAL_LM",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

fn write_works(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let words = ["river", "stone", "lantern", "orchard", "meadow", "harbor", "thread", "winter", "copper", "signal"];
    for w in 0..2u64 {
        let mut rng = Rng::new(100 + w);
        let mut text = String::new();
        while text.len() < 300 {
            text.push_str(words[(rng.next_u64() % words.len() as u64) as usize]);
            text.push(' ');
        }
        text.truncate(300);
        std::fs::write(dir.join(format!("work-{w}.txt")), text.trim_end()).unwrap();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = PathBuf::from(args.get(1).expect("usage: make-big-llama OUT_DIR [type] [shape]"));
    let kind = args.get(2).map(String::as_str).unwrap_or("q4_0");
    let cfg = shape(args.get(3).map(String::as_str).unwrap_or("7b"));
    std::fs::create_dir_all(&out).unwrap();
    let seed = 0x5eed;
    match kind {
        "bf16" | "f16" => {
            let dir = out.join(format!("base-{kind}"));
            std::fs::create_dir_all(&dir).unwrap();
            write_half_safetensors(&cfg, seed, kind == "bf16", &dir.join("model.safetensors"));
            std::fs::write(dir.join("config.json"), cfg.config_json()).unwrap();
            char_tokenizer().save(dir.join("tokenizer.json"), true).unwrap();
            println!("wrote {}", dir.display());
        }
        q => {
            let dtype = match q {
                "q4_0" => GgmlDType::Q4_0,
                "q8_0" => GgmlDType::Q8_0,
                "q4k" => GgmlDType::Q4K,
                "q6k" => GgmlDType::Q6K,
                other => panic!("unknown type {other}"),
            };
            let path = out.join(format!("base-{q}.gguf"));
            write_random_llama_gguf(&cfg, seed, dtype, &path).unwrap();
            println!("wrote {}", path.display());
        }
    }
    write_adapter(&cfg, &out.join("adapter"));
    write_works(&out.join("works"));
}
