//! Base-key resolution: LDM/SGM ↔ diffusers UNet paths against known pairs, kohya names
//! resolved from a base's real key set, never by parsing underscores.

use lorascope::load::names::{diffusers_to_ldm, gguf_to_hf, ldm_to_diffusers, KeyResolver};

/// Pairs from SD1.x (layers_per_block 2), as diffusers' conversion scripts name them.
const PAIRS: &[(&str, &str)] = &[
    ("input_blocks.0.0.weight", "conv_in.weight"),
    (
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    ),
    ("input_blocks.2.0.in_layers.2.weight", "down_blocks.0.resnets.1.conv1.weight"),
    ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
    ("input_blocks.4.1.proj_in.weight", "down_blocks.1.attentions.0.proj_in.weight"),
    ("input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"),
    ("input_blocks.5.0.emb_layers.1.weight", "down_blocks.1.resnets.1.time_emb_proj.weight"),
    ("input_blocks.11.0.out_layers.3.weight", "down_blocks.3.resnets.1.conv2.weight"),
    ("middle_block.0.in_layers.0.weight", "mid_block.resnets.0.norm1.weight"),
    ("middle_block.1.proj_out.weight", "mid_block.attentions.0.proj_out.weight"),
    ("middle_block.2.out_layers.0.bias", "mid_block.resnets.1.norm2.bias"),
    ("output_blocks.0.0.in_layers.2.weight", "up_blocks.0.resnets.0.conv1.weight"),
    (
        "output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight",
    ),
    ("output_blocks.8.1.proj_out.weight", "up_blocks.2.attentions.2.proj_out.weight"),
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("label_emb.0.2.weight", "add_embedding.linear_2.weight"),
    ("out.2.weight", "conv_out.weight"),
];

#[test]
fn ldm_and_diffusers_paths_map_both_ways() {
    for (ldm, diff) in PAIRS {
        assert_eq!(ldm_to_diffusers(ldm, 2).as_deref(), Some(*diff), "{ldm}");
        assert!(diffusers_to_ldm(diff, 2).contains(&ldm.to_string()), "{diff}");
    }
    // Upsamplers: .1.conv in a block without attention, .2.conv with it.
    assert_eq!(
        ldm_to_diffusers("output_blocks.2.1.conv.weight", 2).as_deref(),
        Some("up_blocks.0.upsamplers.0.conv.weight")
    );
    assert_eq!(
        ldm_to_diffusers("output_blocks.5.2.conv.weight", 2).as_deref(),
        Some("up_blocks.1.upsamplers.0.conv.weight")
    );
    assert!(diffusers_to_ldm("up_blocks.1.upsamplers.0.conv.weight", 2)
        .contains(&"output_blocks.5.2.conv.weight".to_string()));
}

#[test]
fn kohya_names_resolve_against_a_diffusers_base() {
    // A diffusers pipeline's UNet keys: kohya SD1.x names (diffusers paths) and SDXL-style SGM
    // names (LDM paths) both land on them.
    let keys = [
        "unet.down_blocks.0.resnets.0.conv1.weight",
        "unet.down_blocks.0.resnets.1.conv1.weight",
        "unet.down_blocks.0.downsamplers.0.conv.weight",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight",
    ];
    let r = KeyResolver::new(keys.iter().copied());
    let ok = |n: &str| r.resolve(n).unwrap();
    assert_eq!(ok("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"), keys[3]);
    assert_eq!(ok("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"), keys[3]);
    assert_eq!(ok("lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj"), keys[4]);
    assert_eq!(ok("lora_unet_down_blocks_0_resnets_1_conv1"), keys[1]);
    assert_eq!(ok("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"), keys[3]);
    assert_eq!(ok("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"), keys[5]);
    assert_eq!(ok("lora_te_text_model_encoder_layers_0_self_attn_q_proj"), keys[5]);
    assert_eq!(ok("lora_te2_text_model_encoder_layers_0_self_attn_q_proj"), keys[6]);
    assert!(r.resolve("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k").is_err());
}

#[test]
fn ambiguous_names_are_refused() {
    // `a.b_c` and `a_b.c` both underscore to `lora_a_b_c`: refuse rather than guess.
    let r = KeyResolver::new(["a.b_c.weight", "a_b.c.weight"].into_iter());
    let e = r.resolve("lora_a_b_c").unwrap_err();
    assert!(e.contains("more than one"), "{e}");
}

#[test]
fn gguf_names_map_to_hugging_face_names() {
    assert_eq!(gguf_to_hf("blk.3.attn_q.weight"), "model.layers.3.self_attn.q_proj.weight");
    assert_eq!(gguf_to_hf("blk.0.ffn_down.weight"), "model.layers.0.mlp.down_proj.weight");
    assert_eq!(gguf_to_hf("blk.12.attn_output.weight"), "model.layers.12.self_attn.o_proj.weight");
    assert_eq!(gguf_to_hf("token_embd.weight"), "model.embed_tokens.weight");
    assert_eq!(gguf_to_hf("output_norm.weight"), "model.norm.weight");
    assert_eq!(gguf_to_hf("rope_freqs.weight"), "rope_freqs.weight");
}

#[test]
fn gguf_unpermute_inverts_llama_cpp_permute() {
    let (rows, cols, heads) = (12, 3, 3);
    let v: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
    let p = lorascope::fixtures::llama_cpp_permute(&v, rows, cols, heads);
    assert_ne!(p, v);
    // Head 0 (rows 0..4) in GGUF order is HF rows 0, 2, 1, 3.
    assert_eq!(&p[3..6], &v[6..9]);
    let back =
        lorascope::load::base::unpermute_rows(&p.iter().map(|x| *x as f64).collect::<Vec<_>>(), rows, cols, heads)
            .unwrap();
    assert_eq!(back, v.iter().map(|x| *x as f64).collect::<Vec<_>>());
}
