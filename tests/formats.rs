#![allow(clippy::needless_range_loop)]
//! Per format: ΔW rebuilt by lorascope equals a dense reference computed here from the raw
//! tensors with plain loops (matmul, Hadamard, Kronecker, reshape), to 1e-6.

mod common;
use common::*;

use lorascope::load::{Format, ModuleKind};
use lorascope::spectral::DeltaW;
use lorascope::{Adapter, BaseModel, LoadOptions, LoraModule};

fn open(name: &str, base: Option<&str>) -> (Adapter, Option<BaseModel>) {
    let b = base.map(|b| fixtures().join(b));
    lorascope::open(&fixtures().join(name), b.as_deref(), &LoadOptions::default()).unwrap()
}

fn module<'a>(a: &'a Adapter, name: &str) -> &'a LoraModule {
    a.modules.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("no module {name}"))
}

fn delta(m: &LoraModule, base: Option<&BaseModel>) -> nalgebra::DMatrix<f64> {
    let w = base.map(|b| b.weight(&m.base_key).unwrap());
    m.dense_delta(w.as_ref()).unwrap()
}

/// Tucker conv: ΔW[o, (j,h,w)] = Σ_mn up[o,m]·mid[m,n,h,w]·down[n,j].
fn tucker(up: &M, mid: &(Vec<usize>, Vec<f64>), down: &M) -> M {
    let (s, t) = mid;
    let (r1, r2, k) = (s[0], s[1], s[2] * s[3]);
    let (out, inp) = (up.r, down.c);
    let mut v = vec![0.0; out * inp * k];
    for o in 0..out {
        for j in 0..inp {
            for hw in 0..k {
                let mut acc = 0.0;
                for m in 0..r1 {
                    for n in 0..r2 {
                        acc += up.at(o, m) * t[(m * r2 + n) * k + hw] * down.at(n, j);
                    }
                }
                v[o * inp * k + j * k + hw] = acc;
            }
        }
    }
    M { r: out, c: inp * k, v }
}

#[test]
fn kohya_linear_conv_and_tucker() {
    let (a, b) = open("kohya-sd-lora.safetensors", Some("sd-tiny-base.safetensors"));
    assert_eq!(a.format, Format::Kohya);
    let f = fixtures().join("kohya-sd-lora.safetensors");
    // Linear: 0.5 · up · down, alpha 2 at rank 4.
    let n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let m = module(&a, n);
    assert_eq!(m.base_key, "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight");
    let want =
        mat(&f, &format!("{n}.lora_up.weight")).matmul(&mat(&f, &format!("{n}.lora_down.weight"))).scale(2.0 / 4.0);
    assert_close(&delta(m, None), &want, 1e-6);
    // No .alpha: alpha = rank, scale 1.
    let n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj";
    let m = module(&a, n);
    assert_eq!((m.alpha, m.scale), (Some(4.0), 1.0));
    let want = mat(&f, &format!("{n}.lora_up.weight")).matmul(&mat(&f, &format!("{n}.lora_down.weight")));
    assert_close(&delta(m, None), &want, 1e-6);
    // Conv LoCon: reshape(up, [out, r]) · reshape(down, [r, in·3·3]) · 1/4.
    let n = "lora_unet_down_blocks_0_resnets_0_conv1";
    let m = module(&a, n);
    assert_eq!(m.kind, ModuleKind::Locon);
    assert_eq!(m.shape, vec![8, 8, 3, 3]);
    assert_eq!(m.base_key, "model.diffusion_model.input_blocks.1.0.in_layers.2.weight");
    let want = mat(&f, &format!("{n}.lora_up.weight")).matmul(&mat(&f, &format!("{n}.lora_down.weight"))).scale(0.25);
    assert_close(&delta(m, None), &want, 1e-6);
    // Tucker (lora_mid) conv.
    let n = "lora_unet_down_blocks_1_resnets_0_conv2";
    let m = module(&a, n);
    assert_eq!(m.base_key, "model.diffusion_model.input_blocks.4.0.out_layers.3.weight");
    let want = tucker(
        &mat(&f, &format!("{n}.lora_up.weight")),
        &raw(&f, &format!("{n}.lora_mid.weight")),
        &mat(&f, &format!("{n}.lora_down.weight")),
    )
    .scale(0.5);
    assert_close(&delta(m, None), &want, 1e-6);
    // SGM (SDXL-style) name and a text-encoder name resolve against LDM keys.
    assert_eq!(
        module(&a, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q").base_key,
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    );
    assert_eq!(
        module(&a, "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v").base_key,
        "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight"
    );
    assert_eq!(
        module(&a, "lora_te_text_model_encoder_layers_1_mlp_fc1").base_key,
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"
    );
    assert!(b.is_some());
}

#[test]
fn loha_linear_and_tucker_conv() {
    let (a, _) = open("lycoris-loha.safetensors", Some("sd-tiny-base.safetensors"));
    assert_eq!(a.format, Format::Lycoris);
    let f = fixtures().join("lycoris-loha.safetensors");
    let n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v";
    let g = |s: &str| mat(&f, &format!("{n}.{s}"));
    let want =
        g("hada_w1_a").matmul(&g("hada_w1_b")).hadamard(&g("hada_w2_a").matmul(&g("hada_w2_b"))).scale(1.5 / 3.0);
    assert_close(&delta(module(&a, n), None), &want, 1e-6);
    // Tucker: w_i = einsum("ijkl,jr,ip->prkl", t_i, b_i, a_i), ΔW = w1 ⊙ w2 · alpha/r.
    let n = "lora_unet_down_blocks_0_resnets_0_conv2";
    let g = |s: &str| mat(&f, &format!("{n}.{s}"));
    let w1 = tucker(&g("hada_w1_a").t(), &raw(&f, &format!("{n}.hada_t1")), &g("hada_w1_b"));
    let w2 = tucker(&g("hada_w2_a").t(), &raw(&f, &format!("{n}.hada_t2")), &g("hada_w2_b"));
    let m = module(&a, n);
    assert_eq!(m.shape, vec![8, 8, 3, 3]);
    assert_close(&delta(m, None), &w1.hadamard(&w2).scale(3.0 / 3.0), 1e-6);
}

#[test]
fn lokr_whole_decomposed_and_tucker() {
    let (a, _) = open("lycoris-lokr.safetensors", Some("sd-tiny-base.safetensors"));
    let f = fixtures().join("lycoris-lokr.safetensors");
    let n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let g = |s: &str| mat(&f, &format!("{n}.{s}"));
    // w2 decomposed with rank 2 and alpha 1: scale 1/2.
    let want = g("lokr_w1").kron(&g("lokr_w2_a").matmul(&g("lokr_w2_b"))).scale(0.5);
    assert_close(&delta(module(&a, n), None), &want, 1e-6);
    // Both factors whole: scale 1 although alpha is 7.
    let n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj";
    let g = |s: &str| mat(&f, &format!("{n}.{s}"));
    let m = module(&a, n);
    assert_eq!(m.scale, 1.0);
    assert_close(&delta(m, None), &g("lokr_w1").kron(&g("lokr_w2")), 1e-6);
    // Conv: kron(w1a·w1b, tucker(t2, w2a, w2b)) flattened, scale alpha/r = 1/2.
    let n = "lora_unet_down_blocks_0_resnets_0_conv1";
    let g = |s: &str| mat(&f, &format!("{n}.{s}"));
    let w1 = g("lokr_w1_a").matmul(&g("lokr_w1_b"));
    let w2 = tucker(&g("lokr_w2_a").t(), &raw(&f, &format!("{n}.lokr_t2")), &g("lokr_w2_b"));
    // kron of [2,2] with a [4, 4·9] flattening equals the flattening of the 4-D kron.
    let m = module(&a, n);
    assert_eq!(m.shape, vec![8, 8, 3, 3]);
    assert_close(&delta(m, None), &w1.kron(&w2).scale(0.5), 1e-6);
}

#[test]
fn full_diff_dora_scale_and_ia3() {
    let (a, b) = open("lycoris-full-dora-ia3.safetensors", Some("sd-tiny-base.safetensors"));
    let b = b.unwrap();
    let f = fixtures().join("lycoris-full-dora-ia3.safetensors");
    let base_f = fixtures().join("sd-tiny-base.safetensors");
    let n = "lora_te_text_model_encoder_layers_0_self_attn_out_proj";
    assert_close(&delta(module(&a, n), Some(&b)), &mat(&f, &format!("{n}.diff")), 1e-6);
    // DoRA with dora_scale [out, 1]: W' = m / ‖W+ΔW‖_row · (W+ΔW).
    let n = "lora_te_text_model_encoder_layers_1_self_attn_k_proj";
    let m = module(&a, n);
    assert_eq!(m.kind, ModuleKind::Dora);
    let w = mat(&base_f, &m.base_key);
    let d = mat(&f, &format!("{n}.lora_up.weight")).matmul(&mat(&f, &format!("{n}.lora_down.weight"))).scale(0.5);
    let merged = w.add(&d);
    let mag = raw(&f, &format!("{n}.dora_scale")).1;
    let mut want = merged.clone();
    for i in 0..merged.r {
        let norm: f64 = (0..merged.c).map(|j| merged.at(i, j).powi(2)).sum::<f64>().sqrt();
        for j in 0..merged.c {
            want.v[i * merged.c + j] = merged.at(i, j) * mag[i] / norm;
        }
    }
    assert_close(&delta(m, Some(&b)), &want.sub(&w), 1e-6);
    // (IA)³ on the input axis: ΔW[i,j] = W[i,j]·w[j].
    let n = "lora_te_text_model_encoder_layers_1_mlp_fc2";
    let m = module(&a, n);
    let w = mat(&base_f, &m.base_key);
    let v = raw(&f, &format!("{n}.weight")).1;
    let want = M { r: w.r, c: w.c, v: (0..w.r * w.c).map(|k| w.v[k] * v[k % w.c]).collect() };
    assert_close(&delta(m, Some(&b)), &want, 1e-6);
    // Without the base these deltas cannot be formed, and say so.
    let err = module(&a, n).dense_delta(None).unwrap_err().to_string();
    assert!(err.contains("--base"), "{err}");
}

#[test]
fn diffusers_peft_style_legacy_and_metadata_alpha() {
    let (a, _) = open("diffusers-lora.safetensors", Some("sd-tiny-base.safetensors"));
    assert_eq!(a.format, Format::Diffusers);
    let f = fixtures().join("diffusers-lora.safetensors");
    let p = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1";
    // alpha 8 and r 4 from lora_adapter_metadata: scale 2.
    let m = module(&a, &format!("{p}.to_k"));
    assert_eq!(m.scale, 2.0);
    let want =
        mat(&f, &format!("{p}.to_k.lora_B.weight")).matmul(&mat(&f, &format!("{p}.to_k.lora_A.weight"))).scale(2.0);
    assert_close(&delta(m, None), &want, 1e-6);
    // Legacy processor key names the to_out.0 linear.
    let m = module(&a, &format!("{p}.to_out.0"));
    assert_eq!(m.base_key, "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight");
    let want = mat(&f, &format!("{p}.processor.to_out_lora.up.weight"))
        .matmul(&mat(&f, &format!("{p}.processor.to_out_lora.down.weight")))
        .scale(2.0);
    assert_close(&delta(m, None), &want, 1e-6);
    // Text encoder: alpha 2, r 4.
    let t = "text_encoder.text_model.encoder.layers.1.self_attn.v_proj";
    let m = module(&a, t);
    assert_eq!(m.scale, 0.5);
    assert_eq!(m.base_key, "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight");
}

#[test]
fn peft_patterns_embedding_and_modules_to_save() {
    let (a, b) = open("peft-llama", Some("llama-tiny"));
    let b = b.unwrap();
    assert_eq!(a.format, Format::Peft);
    let f = fixtures().join("peft-llama/adapter_model.safetensors");
    let base_f = fixtures().join("llama-tiny/model.safetensors");
    let pre = "base_model.model.model.layers";
    // alpha_pattern "layers.1.self_attn.q_proj" = 16 at r 4: scale 4. Layer 0 keeps alpha 8: scale 2.
    for (l, scale) in [(0, 2.0), (1, 4.0)] {
        let m = module(&a, &format!("model.layers.{l}.self_attn.q_proj"));
        assert_eq!(m.scale, scale);
        let want = mat(&f, &format!("{pre}.{l}.self_attn.q_proj.lora_B.weight"))
            .matmul(&mat(&f, &format!("{pre}.{l}.self_attn.q_proj.lora_A.weight")))
            .scale(scale);
        assert_close(&delta(m, None), &want, 1e-6);
    }
    // rank_pattern v_proj = 2: scale 8/2.
    assert_eq!(module(&a, "model.layers.0.self_attn.v_proj").scale, 4.0);
    // Embedding: ΔW = (B·A)ᵀ · 8/4.
    let m = module(&a, "model.embed_tokens");
    assert_eq!(m.kind, ModuleKind::Embedding);
    let want = mat(&f, "base_model.model.model.embed_tokens.lora_embedding_B")
        .matmul(&mat(&f, "base_model.model.model.embed_tokens.lora_embedding_A"))
        .t()
        .scale(2.0);
    assert_close(&delta(m, None), &want, 1e-6);
    // modules_to_save: a replacement, ΔW = new − W.
    let m = module(&a, "lm_head");
    assert_eq!(m.kind, ModuleKind::Full);
    let want = mat(&f, "base_model.model.lm_head.weight").sub(&mat(&base_f, "lm_head.weight"));
    assert_close(&delta(m, Some(&b)), &want, 1e-6);
}

#[test]
fn peft_dora_rslora_on_gguf_base() {
    // The GGUF base stores q/k permuted for llama.cpp's rotary layout; lorascope must undo it,
    // so the DoRA norm is taken over the same rows as with the safetensors base.
    let (a, b) = open("peft-dora-llama", Some("llama-tiny.gguf"));
    let b = b.unwrap();
    let f = fixtures().join("peft-dora-llama/adapter_model.safetensors");
    let base_f = fixtures().join("llama-tiny/model.safetensors");
    let p = "base_model.model.model.layers.1.self_attn.q_proj";
    let m = module(&a, "model.layers.1.self_attn.q_proj");
    assert_eq!(m.kind, ModuleKind::Dora);
    // rsLoRA: alpha 16 (pattern) / sqrt(4) = 8.
    assert_eq!(m.scale, 8.0);
    let w = mat(&base_f, "model.layers.1.self_attn.q_proj.weight");
    let merged =
        w.add(&mat(&f, &format!("{p}.lora_B.weight")).matmul(&mat(&f, &format!("{p}.lora_A.weight"))).scale(8.0));
    let mag = raw(&f, &format!("{p}.lora_magnitude_vector")).1;
    let mut want = merged.clone();
    for i in 0..merged.r {
        let norm: f64 = (0..merged.c).map(|j| merged.at(i, j).powi(2)).sum::<f64>().sqrt();
        for j in 0..merged.c {
            want.v[i * merged.c + j] *= mag[i] / norm;
        }
    }
    assert_close(&delta(m, Some(&b)), &want.sub(&w), 1e-6);
}

#[test]
fn gguf_base_matches_safetensors_base() {
    let st = BaseModel::open(&fixtures().join("llama-tiny")).unwrap();
    let gg = BaseModel::open(&fixtures().join("llama-tiny.gguf")).unwrap();
    let sk: Vec<&str> = st.keys().collect();
    let gk: Vec<&str> = gg.keys().collect();
    assert_eq!(sk, gk, "GGUF names map to the Hugging Face names");
    for k in sk {
        assert_eq!(st.weight(k).unwrap(), gg.weight(k).unwrap(), "{k}");
    }
}

#[test]
fn forced_format_and_pattern_precedence() {
    let cfg = lorascope::load::LoraConfig::from_json(&serde_json::json!({
        "r": 8, "lora_alpha": 16,
        "rank_pattern": {"q_proj": 4, "model.layers.1.self_attn.q_proj": 2},
        "alpha_pattern": {"layers\\.[0-9]+\\.mlp\\..*": 3}
    }));
    let rank = |m: &str| cfg.rank_for(m).unwrap();
    let alpha = |m: &str| cfg.alpha_for(m).unwrap();
    // An exact key wins over an earlier suffix pattern.
    assert_eq!(rank("model.layers.1.self_attn.q_proj"), Some(2));
    assert_eq!(rank("model.layers.0.self_attn.q_proj"), Some(4));
    // Patterns are regular expressions matched on a dotted suffix.
    assert_eq!(alpha("model.layers.3.mlp.up_proj"), Some(3.0));
    assert_eq!(alpha("model.layers.3.self_attn.v_proj"), Some(16.0));
    assert_eq!(rank("model.layers.0.self_attn.xq_proj"), Some(8), "no match inside a name part");
    let opts = LoadOptions { format: Some(Format::Kohya), ..Default::default() };
    let err = Adapter::open(&fixtures().join("peft-llama"), &opts).err().expect("kohya parse of a PEFT file fails");
    assert!(err.to_string().contains("adapter_model.safetensors"), "{err}");
}
