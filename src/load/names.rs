//! Mapping adapter module names to base weight keys.
//!
//! kohya names replace every `.` of a module path with `_`, and module paths contain `_`
//! themselves (`transformer_blocks`, `to_q`, `self_attn`), so a name cannot be parsed back.
//! As ComfyUI does (`model_lora_keys_unet`/`_clip`), we go the other way: from the base
//! model's actual keys we build every name an adapter could use for each weight, in every
//! naming scheme (diffusers and original-LDM/SGM UNet paths, CLIP text encoders, BFL Flux and
//! SD3 MMDiT transformer paths as sd-scripts `lora_flux.py`/`lora_sd3.py` name them, llama.cpp
//! GGUF names), and look the adapter's names up in that table.

use std::collections::{BTreeMap, BTreeSet};

/// Which sub-model of a pipeline a weight belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Component {
    UnetLdm,
    UnetDiffusers,
    TextEncoder1,
    TextEncoder2,
    /// A BFL Flux or SD3 MMDiT transformer file without the `model.diffusion_model.` prefix.
    Dit,
    Other,
}

/// The first segments of BFL Flux (`flux1-dev.safetensors`) and SD3 MMDiT module paths.
const DIT_ROOTS: &[&str] = &[
    "double_blocks.",
    "single_blocks.",
    "img_in.",
    "txt_in.",
    "time_in.",
    "vector_in.",
    "guidance_in.",
    "final_layer.",
    "joint_blocks.",
    "x_embedder.",
    "context_embedder.",
    "t_embedder.",
    "y_embedder.",
];

const DIFFUSERS_UNET_ROOTS: &[&str] = &[
    "down_blocks.",
    "up_blocks.",
    "mid_block.",
    "conv_in.",
    "conv_out.",
    "conv_norm_out.",
    "time_embedding.",
    "add_embedding.",
];
const LDM_UNET_ROOTS: &[&str] =
    &["input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out."];

fn split_component(key: &str) -> (Component, &str) {
    let prefixes: &[(&str, Component)] = &[
        ("model.diffusion_model.", Component::UnetLdm),
        ("unet.", Component::UnetDiffusers),
        ("cond_stage_model.transformer.", Component::TextEncoder1),
        ("conditioner.embedders.0.transformer.", Component::TextEncoder1),
        ("text_encoder_2.", Component::TextEncoder2),
        ("text_encoder.", Component::TextEncoder1),
    ];
    for (p, c) in prefixes {
        if let Some(rest) = key.strip_prefix(p) {
            if *c == Component::UnetDiffusers && LDM_UNET_ROOTS.iter().any(|r| rest.starts_with(r)) {
                return (Component::UnetLdm, rest);
            }
            return (*c, rest);
        }
    }
    if DIFFUSERS_UNET_ROOTS.iter().any(|r| key.starts_with(r)) {
        return (Component::UnetDiffusers, key);
    }
    if LDM_UNET_ROOTS.iter().any(|r| key.starts_with(r)) && !key.starts_with("output.") {
        return (Component::UnetLdm, key);
    }
    if key.starts_with("text_model.") {
        return (Component::TextEncoder1, key);
    }
    if DIT_ROOTS.iter().any(|r| key.starts_with(r)) {
        return (Component::Dit, key);
    }
    (Component::Other, key)
}

/// A CLIP text encoder path with and without the `text_model.` level: transformers before 5
/// saved `CLIPTextModel` as `text_model.encoder.…` (and kohya names its modules
/// `lora_te_text_model_encoder_…` after it); transformers ≥ 5 saves `encoder.…`, as do some
/// old LDM checkpoints under `cond_stage_model.transformer.`. Either naming of an adapter
/// resolves against either layout of a base. Paths outside a CLIP text model are kept as they
/// are.
fn clip_paths(path: &str) -> Vec<String> {
    const CLIP_ROOTS: &[&str] = &["embeddings.", "encoder.", "final_layer_norm."];
    match path.strip_prefix("text_model.") {
        Some(rest) => vec![path.to_string(), rest.to_string()],
        None if CLIP_ROOTS.iter().any(|r| path.starts_with(r)) => vec![path.to_string(), format!("text_model.{path}")],
        None => vec![path.to_string()],
    }
}

fn underscored(path: &str) -> String {
    path.replace('.', "_")
}

fn resnet_ldm_to_diffusers(rest: &str) -> String {
    const MAP: &[(&str, &str)] = &[
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("emb_layers.1", "time_emb_proj"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
        ("skip_connection", "conv_shortcut"),
    ];
    for (l, d) in MAP {
        if let Some(tail) = rest.strip_prefix(l) {
            return format!("{d}{tail}");
        }
    }
    rest.to_string()
}

fn resnet_diffusers_to_ldm(rest: &str) -> String {
    const MAP: &[(&str, &str)] = &[
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("conv_shortcut", "skip_connection"),
    ];
    for (d, l) in MAP {
        if let Some(tail) = rest.strip_prefix(d) {
            if tail.is_empty() || tail.starts_with('.') {
                return format!("{l}{tail}");
            }
        }
    }
    rest.to_string()
}

fn join(head: String, rest: &[&str]) -> String {
    if rest.is_empty() {
        head
    } else {
        format!("{head}.{}", rest.join("."))
    }
}

/// Original-LDM / SGM UNet path → diffusers path (diffusers' `_maybe_map_sgm_blocks_to_diffusers`
/// and `convert_ldm_unet_checkpoint` conventions), with `l` = layers_per_block.
pub fn ldm_to_diffusers(path: &str, l: usize) -> Option<String> {
    let parts: Vec<&str> = path.split('.').collect();
    let idx = |k: usize| parts.get(k).and_then(|s| s.parse::<usize>().ok());
    match parts[0] {
        "input_blocks" => {
            let (i, j) = (idx(1)?, idx(2)?);
            let rest = &parts[3..];
            if i == 0 {
                return (j == 0).then(|| join("conv_in".into(), rest));
            }
            let (b, s) = ((i - 1) / (l + 1), (i - 1) % (l + 1));
            match (j, s == l) {
                (0, true) => (rest.first() == Some(&"op"))
                    .then(|| join(format!("down_blocks.{b}.downsamplers.0.conv"), &rest[1..])),
                (0, false) => Some(format!("down_blocks.{b}.resnets.{s}.{}", resnet_ldm_to_diffusers(&rest.join(".")))),
                (1, false) => Some(join(format!("down_blocks.{b}.attentions.{s}"), rest)),
                _ => None,
            }
        }
        "middle_block" => {
            let j = idx(1)?;
            let rest = &parts[2..];
            match j {
                0 | 2 => Some(format!("mid_block.resnets.{}.{}", j / 2, resnet_ldm_to_diffusers(&rest.join(".")))),
                1 => Some(join("mid_block.attentions.0".into(), rest)),
                _ => None,
            }
        }
        "output_blocks" => {
            let (i, j) = (idx(1)?, idx(2)?);
            let rest = &parts[3..];
            let (b, s) = (i / (l + 1), i % (l + 1));
            if j > 0 && rest.first() == Some(&"conv") && s == l {
                return Some(join(format!("up_blocks.{b}.upsamplers.0.conv"), &rest[1..]));
            }
            match j {
                0 => Some(format!("up_blocks.{b}.resnets.{s}.{}", resnet_ldm_to_diffusers(&rest.join(".")))),
                1 => Some(join(format!("up_blocks.{b}.attentions.{s}"), rest)),
                _ => None,
            }
        }
        "time_embed" => match idx(1)? {
            0 => Some(join("time_embedding.linear_1".into(), &parts[2..])),
            2 => Some(join("time_embedding.linear_2".into(), &parts[2..])),
            _ => None,
        },
        "label_emb" => match (idx(1)?, idx(2)?) {
            (0, 0) => Some(join("add_embedding.linear_1".into(), &parts[3..])),
            (0, 2) => Some(join("add_embedding.linear_2".into(), &parts[3..])),
            _ => None,
        },
        "out" => match idx(1)? {
            0 => Some(join("conv_norm_out".into(), &parts[2..])),
            2 => Some(join("conv_out".into(), &parts[2..])),
            _ => None,
        },
        _ => None,
    }
}

/// diffusers UNet path → LDM/SGM path(s). An upsampler conv sits at `.1.conv` or `.2.conv`
/// depending on whether its block has attention, so both candidates are returned.
pub fn diffusers_to_ldm(path: &str, l: usize) -> Vec<String> {
    let parts: Vec<&str> = path.split('.').collect();
    let idx = |k: usize| parts.get(k).and_then(|s| s.parse::<usize>().ok());
    let one = |s: String| vec![s];
    match parts[0] {
        "conv_in" => one(join("input_blocks.0.0".into(), &parts[1..])),
        "conv_norm_out" => one(join("out.0".into(), &parts[1..])),
        "conv_out" => one(join("out.2".into(), &parts[1..])),
        "time_embedding" => match parts.get(1) {
            Some(&"linear_1") => one(join("time_embed.0".into(), &parts[2..])),
            Some(&"linear_2") => one(join("time_embed.2".into(), &parts[2..])),
            _ => vec![],
        },
        "add_embedding" => match parts.get(1) {
            Some(&"linear_1") => one(join("label_emb.0.0".into(), &parts[2..])),
            Some(&"linear_2") => one(join("label_emb.0.2".into(), &parts[2..])),
            _ => vec![],
        },
        "down_blocks" => {
            let (Some(b), Some(kind)) = (idx(1), parts.get(2)) else { return vec![] };
            match (*kind, idx(3)) {
                ("resnets", Some(s)) => one(format!(
                    "input_blocks.{}.0.{}",
                    b * (l + 1) + s + 1,
                    resnet_diffusers_to_ldm(&parts[4..].join("."))
                )),
                ("attentions", Some(s)) => one(join(format!("input_blocks.{}.1", b * (l + 1) + s + 1), &parts[4..])),
                ("downsamplers", Some(0)) if parts.get(4) == Some(&"conv") => {
                    one(join(format!("input_blocks.{}.0.op", (b + 1) * (l + 1)), &parts[5..]))
                }
                _ => vec![],
            }
        }
        "mid_block" => match (parts.get(1), idx(2)) {
            (Some(&"resnets"), Some(s)) => {
                one(format!("middle_block.{}.{}", 2 * s, resnet_diffusers_to_ldm(&parts[3..].join("."))))
            }
            (Some(&"attentions"), Some(0)) => one(join("middle_block.1".into(), &parts[3..])),
            _ => vec![],
        },
        "up_blocks" => {
            let (Some(b), Some(kind)) = (idx(1), parts.get(2)) else { return vec![] };
            match (*kind, idx(3)) {
                ("resnets", Some(s)) => one(format!(
                    "output_blocks.{}.0.{}",
                    b * (l + 1) + s,
                    resnet_diffusers_to_ldm(&parts[4..].join("."))
                )),
                ("attentions", Some(s)) => one(join(format!("output_blocks.{}.1", b * (l + 1) + s), &parts[4..])),
                ("upsamplers", Some(0)) if parts.get(4) == Some(&"conv") => {
                    let i = b * (l + 1) + l;
                    vec![
                        join(format!("output_blocks.{i}.1.conv"), &parts[5..]),
                        join(format!("output_blocks.{i}.2.conv"), &parts[5..]),
                    ]
                }
                _ => vec![],
            }
        }
        _ => vec![],
    }
}

/// diffusers `AutoencoderKL` path → original-LDM `first_stage_model.` path (diffusers'
/// `convert_ldm_vae_checkpoint`, read backwards), for a VAE of `levels` resolution levels (the
/// decoder's up blocks are numbered from the deepest level in diffusers, from the shallowest in
/// LDM). The attention's q/k/v/proj_out are 1×1 convolutions in LDM, linear layers in diffusers:
/// the same values, one shape apart.
pub fn vae_diffusers_to_ldm(path: &str, levels: usize) -> Option<String> {
    let parts: Vec<&str> = path.split('.').collect();
    let part = *parts.first()?;
    if !matches!(part, "encoder" | "decoder") {
        return matches!(part, "quant_conv" | "post_quant_conv").then(|| path.to_string());
    }
    let idx = |k: usize| parts.get(k).and_then(|s| s.parse::<usize>().ok());
    let resnet = |rest: &[&str]| rest.join(".").replacen("conv_shortcut", "nin_shortcut", 1);
    let mapped = match *parts.get(1)? {
        "conv_in" | "conv_out" => parts[1..].join("."),
        "conv_norm_out" => join("norm_out".into(), &parts[2..]),
        "down_blocks" if part == "encoder" => {
            let i = idx(2)?;
            match (*parts.get(3)?, idx(4)) {
                ("resnets", Some(j)) => format!("down.{i}.block.{j}.{}", resnet(&parts[5..])),
                ("downsamplers", Some(0)) => join(format!("down.{i}.downsample"), &parts[5..]),
                _ => return None,
            }
        }
        "up_blocks" if part == "decoder" => {
            let i = levels.checked_sub(1)?.checked_sub(idx(2)?)?;
            match (*parts.get(3)?, idx(4)) {
                ("resnets", Some(j)) => format!("up.{i}.block.{j}.{}", resnet(&parts[5..])),
                ("upsamplers", Some(0)) => join(format!("up.{i}.upsample"), &parts[5..]),
                _ => return None,
            }
        }
        "mid_block" => match (*parts.get(2)?, idx(3)) {
            ("resnets", Some(j)) => format!("mid.block_{}.{}", j + 1, resnet(&parts[4..])),
            ("attentions", Some(0)) => {
                let rest = parts[4..].join(".");
                const ATTN: &[(&str, &str)] =
                    &[("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")];
                let (d, l) = ATTN.iter().find(|(d, _)| rest.starts_with(&format!("{d}.")))?;
                format!("mid.attn_1.{l}{}", &rest[d.len()..])
            }
            _ => return None,
        },
        _ => return None,
    };
    Some(format!("{part}.{mapped}"))
}

/// transformers `CLIPTextModel` path (under `text_model.`) → open_clip path (under
/// `cond_stage_model.model.`, SD 2.x single files) and, for q/k/v, which third of open_clip's
/// fused `in_proj` (rows `i·D..(i+1)·D`) holds it (diffusers' `convert_open_clip_checkpoint`).
pub fn clip_to_openclip(path: &str) -> Option<(String, Option<usize>)> {
    let parts: Vec<&str> = path.split('.').collect();
    let tail = |k: usize| parts[k..].join(".");
    match *parts.first()? {
        "embeddings" => match (*parts.get(1)?, parts.get(2)) {
            ("token_embedding", Some(&"weight")) => Some(("token_embedding.weight".into(), None)),
            ("position_embedding", Some(&"weight")) => Some(("positional_embedding".into(), None)),
            _ => None,
        },
        "final_layer_norm" => Some((join("ln_final".into(), &parts[1..]), None)),
        "encoder" if parts.get(1) == Some(&"layers") => {
            let i: usize = parts.get(2)?.parse().ok()?;
            let at = format!("transformer.resblocks.{i}");
            let suffix = *parts.last()?;
            let third = |n: usize| Some((format!("{at}.attn.in_proj_{suffix}"), Some(n)));
            match tail(3).as_str() {
                s if s.starts_with("self_attn.q_proj.") => third(0),
                s if s.starts_with("self_attn.k_proj.") => third(1),
                s if s.starts_with("self_attn.v_proj.") => third(2),
                s if s.starts_with("self_attn.out_proj.") => Some((format!("{at}.attn.out_proj.{suffix}"), None)),
                s if s.starts_with("layer_norm1.") => Some((format!("{at}.ln_1.{suffix}"), None)),
                s if s.starts_with("layer_norm2.") => Some((format!("{at}.ln_2.{suffix}"), None)),
                s if s.starts_with("mlp.fc1.") => Some((format!("{at}.mlp.c_fc.{suffix}"), None)),
                s if s.starts_with("mlp.fc2.") => Some((format!("{at}.mlp.c_proj.{suffix}"), None)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// layers_per_block of a UNet, read off its keys (2 for SD1.x, SD2.x and SDXL).
fn layers_per_block<'a>(keys: impl Iterator<Item = &'a str>) -> usize {
    let mut best = None;
    for k in keys {
        let (c, p) = split_component(k);
        match c {
            // The first downsampler sits at input_blocks.{L+1}.0.op.
            Component::UnetLdm => {
                if let Some(rest) = p.strip_prefix("input_blocks.") {
                    let mut it = rest.split('.');
                    if let (Some(i), Some("0"), Some("op")) =
                        (it.next().and_then(|s| s.parse::<usize>().ok()), it.next(), it.next())
                    {
                        best = Some(best.map_or(i - 1, |b: usize| b.min(i - 1)));
                    }
                }
            }
            Component::UnetDiffusers => {
                if let Some(rest) = p.strip_prefix("down_blocks.0.resnets.") {
                    if let Some(s) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
                        best = Some(best.map_or(s + 1, |b: usize| b.max(s + 1)));
                    }
                }
            }
            _ => {}
        }
    }
    best.unwrap_or(2)
}

/// The table from every name an adapter may use to the base key it denotes.
#[derive(Debug, Default)]
pub struct KeyResolver {
    map: BTreeMap<String, String>,
    ambiguous: BTreeSet<String>,
}

impl KeyResolver {
    pub fn new<'a>(keys: impl Iterator<Item = &'a str> + Clone) -> Self {
        let l = layers_per_block(keys.clone());
        let mut r = KeyResolver::default();
        for key in keys {
            let Some(stem) = key.strip_suffix(".weight") else { continue };
            r.add(stem.to_string(), key);
            let (comp, path) = split_component(stem);
            match comp {
                Component::UnetLdm | Component::UnetDiffusers => {
                    let mut paths = vec![path.to_string()];
                    if comp == Component::UnetLdm {
                        // A checkpoint's own path under `model.diffusion_model.`, as ComfyUI's
                        // `diffusion_model.…` names and XLabs/kohya Flux names read back give it.
                        r.add(path.to_string(), key);
                        paths.extend(ldm_to_diffusers(path, l));
                    } else {
                        paths.extend(diffusers_to_ldm(path, l));
                    }
                    for p in paths {
                        r.add(format!("unet.{p}"), key);
                        r.add(format!("lora_unet_{}", underscored(&p)), key);
                        r.add(format!("lycoris_{}", underscored(&p)), key);
                    }
                }
                Component::TextEncoder1 => {
                    for p in clip_paths(path) {
                        r.add(format!("text_encoder.{p}"), key);
                        r.add(format!("lora_te_{}", underscored(&p)), key);
                        r.add(format!("lora_te1_{}", underscored(&p)), key);
                    }
                }
                Component::TextEncoder2 => {
                    for p in clip_paths(path) {
                        r.add(format!("text_encoder_2.{p}"), key);
                        r.add(format!("lora_te2_{}", underscored(&p)), key);
                    }
                }
                Component::Dit => {
                    // sd-scripts lora_flux.py / lora_sd3.py: `lora_unet_` + the path, `.`→`_`.
                    r.add(format!("lora_unet_{}", underscored(path)), key);
                    r.add(format!("lycoris_{}", underscored(path)), key);
                }
                Component::Other => {
                    // A bare diffusers transformer (Flux, SD3): OneTrainer's kohya-style names,
                    // as ComfyUI's `model_lora_keys_unet` maps them.
                    if path.starts_with("transformer_blocks.") || path.starts_with("single_transformer_blocks.") {
                        r.add(format!("lora_transformer_{}", underscored(path)), key);
                    }
                    r.add(format!("lora_{}", underscored(path)), key);
                    r.add(format!("lycoris_{}", underscored(path)), key);
                }
            }
        }
        r
    }

    fn add(&mut self, alias: String, key: &str) {
        match self.map.get(&alias) {
            Some(existing) if existing != key => {
                self.ambiguous.insert(alias);
            }
            _ => {
                self.map.insert(alias, key.to_string());
            }
        }
    }

    /// The base key an adapter module name denotes. `Err` carries why it could not be resolved.
    pub fn resolve(&self, name: &str) -> std::result::Result<String, String> {
        let mut candidates = vec![name.to_string()];
        // A diffusers-style `unet.`/`transformer.` name against a bare component file; ComfyUI's
        // and AI-toolkit's `diffusion_model.` against a bare or a `model.diffusion_model.` file.
        for prefix in ["unet.", "transformer.", "diffusion_model."] {
            if let Some(rest) = name.strip_prefix(prefix) {
                candidates.push(rest.to_string());
            }
        }
        if name.starts_with("diffusion_model.") {
            candidates.push(format!("model.{name}"));
        }
        for c in &candidates {
            if self.ambiguous.contains(c) {
                return Err(format!("{name} matches more than one base weight"));
            }
            if let Some(k) = self.map.get(c) {
                return Ok(k.clone());
            }
        }
        Err(format!("{name} matches no base weight"))
    }
}

/// llama.cpp GGUF tensor name → Hugging Face llama name (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`). Names it does not know are kept.
pub fn gguf_to_hf(name: &str) -> String {
    let (stem, suffix) = match name.rsplit_once('.') {
        Some((s, suf @ ("weight" | "bias"))) => (s, format!(".{suf}")),
        _ => (name, String::new()),
    };
    let mapped = match stem {
        "token_embd" => Some("model.embed_tokens".to_string()),
        "output_norm" => Some("model.norm".to_string()),
        "output" => Some("lm_head".to_string()),
        _ => stem.strip_prefix("blk.").and_then(|rest| {
            let (n, part) = rest.split_once('.')?;
            let hf = match part {
                "attn_norm" => "input_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_norm" => "post_attention_layernorm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => return None,
            };
            Some(format!("model.layers.{n}.{hf}"))
        }),
    };
    match mapped {
        Some(m) => format!("{m}{suffix}"),
        None => name.to_string(),
    }
}
