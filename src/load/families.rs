//! Model families told from adapter key names: the architecture an adapter was trained for
//! (without a base, from built-in key templates), the base weight a Flux/SD3 module name denotes
//! (undoing kohya's `.`→`_` with the module-path vocabulary of those models), the XLabs Flux
//! processor names, and the explanation when an adapter and a base use the two Flux layouts.
//!
//! Sources (read for the facts, no code taken):
//! - sd-scripts `networks/lora_flux.py` (prefixes `lora_unet`, `lora_te1` CLIP-L, `lora_te3`
//!   T5; modules of `DoubleStreamBlock`/`SingleStreamBlock` named `lora_unet_` + the module path
//!   with `.`→`_`; scale alpha/rank, alpha 0 or missing = rank), `networks/lora_sd3.py` (`lora_unet`
//!   MMDiT, `lora_te1` CLIP-L, `lora_te2` CLIP-G, `lora_te3` T5), `library/sd3_models.py`
//!   (`joint_blocks.N.{x_block,context_block}.{attn,attn2}.{qkv,proj}`, `mlp.fc1/fc2`,
//!   `adaLN_modulation.1`), `networks/lora.py` (SD1/SD2/SDXL `lora_unet_`, `lora_te_`,
//!   `lora_te1_`/`lora_te2_`).
//! - BFL Flux module paths (`double_blocks.N.{img,txt}_{attn.qkv,attn.proj,mlp.0,mlp.2,mod.lin}`,
//!   `single_blocks.N.{linear1,linear2,modulation.lin}`, `img_in`, `txt_in`,
//!   `{time,vector,guidance}_in.{in,out}_layer`, `final_layer.{linear,adaLN_modulation.1}`) as
//!   diffusers `loaders/lora_conversion_utils.py` `_convert_kohya_flux_lora_to_diffusers` lists
//!   them.
//! - XLabs x-flux `DoubleStreamBlockLoraProcessor` (`qkv_lora1`, `proj_lora1` on the image
//!   stream, `qkv_lora2`, `proj_lora2` on the text stream; `LoRALinearLayer` `down`/`up`, scaled
//!   by network_alpha/rank only when an alpha is given, and the files store none), mapped as
//!   diffusers `_convert_xlabs_flux_lora_to_diffusers` and ComfyUI `convert_uso_lora` map them
//!   (single blocks: `qkv_lora` → the q, k, v rows of `linear1`, `proj_lora` → `linear2`).
//! - diffusers `FluxTransformer2DModel` (`transformer_blocks`, `single_transformer_blocks`) and
//!   `SD3Transformer2DModel` (`transformer_blocks` only; `attn2` in SD3.5 Medium); widths 3072
//!   (Flux.1), 1536 (SD3 Medium, SD3.5 Medium), 2432 (SD3.5 Large).

use std::collections::BTreeSet;

use super::module::{LoraModule, ModuleKind};
use crate::named::closed_set;

closed_set! {
    /// The model family an adapter's keys point to.
    pub enum Family ("architecture") {
        Flux = "Flux.1",
        Sd3 = "SD3/SD3.5",
        /// diffusers joint-transformer names that Flux.1 and SD3 share, at a width neither has.
        Mmdit = "MMDiT transformer (Flux.1 or SD3; the keys alone do not tell)",
        Sdxl = "SDXL",
        Sd2 = "SD2.x",
        Sd1 = "SD1.x",
        SdFamily = "SD-family (UNet + CLIP text encoder)",
        Llama = "llama-like decoder",
        Gpt2 = "GPT-2-like decoder",
        EmbeddingOnly = "embedding-only",
        Unknown = "unknown",
    }
}

/// Key templates, first match wins: a family is named when every string of a row occurs in
/// some module's name or base key. Order matters where names overlap (SD3 names its CLIP-G
/// encoder `lora_te2_` as SDXL does; Flux and SD3 both write `lora_te3_` for T5).
const TEMPLATES: &[(Family, &[&str])] = &[
    // BFL Flux paths: kohya `lora_unet_double_blocks_0_…`, XLabs `double_blocks.0.processor.…`,
    // AI-toolkit/ComfyUI `diffusion_model.double_blocks.0.…` (lora_flux.py, x-flux layers.py).
    (Family::Flux, &["double_blocks"]),
    (Family::Flux, &["single_blocks"]),
    // diffusers FluxTransformer2DModel; SD3 has no single-stream blocks.
    (Family::Flux, &["single_transformer_blocks"]),
    // SD3's original MMDiT paths (sd3_models.py; kohya `lora_unet_joint_blocks_…`).
    (Family::Sd3, &["joint_blocks"]),
    // Text encoders only: CLIP-L + CLIP-G + T5 is SD3 (lora_sd3.py), CLIP-L + T5 is Flux.
    (Family::Sd3, &["lora_te2_", "lora_te3_"]),
    (Family::Flux, &["lora_te3_"]),
    // diffusers joint blocks, which both transformers have (refined by width).
    (Family::Mmdit, &["transformer.transformer_blocks"]),
    (Family::Mmdit, &["lora_transformer_transformer_blocks"]),
    // SDXL: the second text encoder, or the UNet's added (pooled text + size) embedding.
    (Family::Sdxl, &["lora_te2_"]),
    (Family::Sdxl, &["text_encoder_2"]),
    (Family::Sdxl, &["conditioner.embedders.1"]),
    (Family::Sdxl, &["label_emb"]),
    (Family::Sdxl, &["add_embedding"]),
    // Other UNet + CLIP adapters (refined by the cross-attention width).
    (Family::SdFamily, &["lora_unet"]),
    (Family::SdFamily, &["unet."]),
    (Family::SdFamily, &["down_blocks"]),
    (Family::SdFamily, &["input_blocks"]),
    (Family::SdFamily, &["lora_te_"]),
    (Family::SdFamily, &["lora_te1_"]),
    (Family::SdFamily, &["diffusion_model"]),
    (Family::Llama, &["self_attn.q_proj"]),
    (Family::Llama, &["mlp.gate_proj"]),
    (Family::Llama, &["self_attn_q_proj"]),
    (Family::Gpt2, &["c_attn"]),
    (Family::Gpt2, &["attn.c_proj"]),
];

/// The architecture an adapter's modules point to, with what the keys add to the family
/// (the layers a decoder adapter touches).
pub(crate) fn guess_architecture(modules: &[LoraModule]) -> String {
    let any = |pat: &str| modules.iter().any(|m| m.name.contains(pat) || m.base_key.contains(pat));
    let family = TEMPLATES.iter().find(|(_, all)| all.iter().all(|p| any(p))).map(|(f, _)| *f);
    let family = match family {
        Some(Family::Mmdit) => mmdit_by_width(modules),
        Some(Family::SdFamily) => sd_by_context_width(modules),
        Some(f) => f,
        None if !modules.is_empty() && modules.iter().all(|m| m.kind == ModuleKind::Embedding) => Family::EmbeddingOnly,
        None => Family::Unknown,
    };
    match family {
        Family::Llama => format!("{family}{}", decoder_layers(modules)),
        f => f.to_string(),
    }
}

/// diffusers joint blocks: SD3.5 Medium alone has `attn2`; else the hidden width, read off an
/// attention projection's input (3072 Flux.1; 1536 SD3/SD3.5 Medium, 2432 SD3.5 Large).
fn mmdit_by_width(modules: &[LoraModule]) -> Family {
    let joint = |m: &&LoraModule| m.name.contains("transformer_blocks");
    if modules.iter().filter(joint).any(|m| m.name.contains("attn2")) {
        return Family::Sd3;
    }
    let width = modules
        .iter()
        .filter(joint)
        .find(|m| ["attn.to_q", "attn_to_q", "attn.to_k", "attn_to_k"].iter().any(|p| m.name.ends_with(p)))
        .and_then(|m| m.shape.get(1).copied());
    match width {
        Some(3072) => Family::Flux,
        Some(1536 | 2432) => Family::Sd3,
        _ => Family::Mmdit,
    }
}

/// The cross-attention key projection's input width is the text-encoder width: 768 for SD1.x
/// (CLIP ViT-L), 1024 for SD2.x (OpenCLIP ViT-H), 2048 for SDXL.
fn sd_by_context_width(modules: &[LoraModule]) -> Family {
    let ctx = modules
        .iter()
        .find(|m| m.name.contains("attn2") && (m.name.contains("to_k") || m.name.contains("to_v")))
        .and_then(|m| m.shape.get(1).copied());
    match ctx {
        Some(2048) => Family::Sdxl,
        Some(1024) => Family::Sd2,
        Some(768) => Family::Sd1,
        _ => Family::SdFamily,
    }
}

/// " (adapter touches N layers[: ranges])" for a decoder adapter with `layers.N` names.
fn decoder_layers(modules: &[LoraModule]) -> String {
    let layers: BTreeSet<usize> = modules
        .iter()
        .filter_map(|m| m.name.split("layers.").nth(1).and_then(|r| r.split('.').next()).and_then(|n| n.parse().ok()))
        .collect();
    match layers.len() {
        0 => String::new(),
        // Counted, not the highest index + 1: an adapter on layers 24–29 touches 6 layers.
        n if layers.last() == Some(&(n - 1)) => format!(" (adapter touches {n} layers)"),
        n => format!(" (adapter touches {n} layers: {})", layer_ranges(&layers)),
    }
}

/// Layer indices as ranges: {0, 2, 5, 6, 7} → "0, 2, 5–7".
fn layer_ranges(layers: &BTreeSet<usize>) -> String {
    let mut parts: Vec<String> = vec![];
    let mut run: Option<(usize, usize)> = None;
    let close = |(a, b): (usize, usize)| if a == b { a.to_string() } else { format!("{a}–{b}") };
    for &l in layers {
        run = match run {
            Some((a, b)) if l == b + 1 => Some((a, l)),
            Some(r) => {
                parts.push(close(r));
                Some((l, l))
            }
            None => Some((l, l)),
        };
    }
    parts.extend(run.map(close));
    parts.join(", ")
}

/// Module-path segments of the BFL Flux and SD3 MMDiT transformers that contain `_` (kohya
/// names replace `.` with `_`, so these must be read as one segment). Every other segment of
/// those paths is one word or a number.
const DIT_SEGMENTS: &[&str] = &[
    "double_blocks",
    "single_blocks",
    "img_attn",
    "txt_attn",
    "img_mlp",
    "txt_mlp",
    "img_mod",
    "txt_mod",
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "in_layer",
    "out_layer",
    "final_layer",
    "adaLN_modulation",
    "query_norm",
    "key_norm",
    "joint_blocks",
    "x_block",
    "context_block",
    "x_embedder",
    "context_embedder",
    "t_embedder",
    "y_embedder",
];

/// The one-word segments of those paths.
const DIT_WORDS: &[&str] =
    &["qkv", "proj", "lin", "linear", "linear1", "linear2", "modulation", "norm", "attn", "attn2", "mlp", "fc1", "fc2"];

/// The first segment of every BFL Flux / SD3 MMDiT module path.
const DIT_ROOTS: &[&str] = &[
    "double_blocks",
    "single_blocks",
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "final_layer",
    "joint_blocks",
    "x_embedder",
    "context_embedder",
    "t_embedder",
    "y_embedder",
];

/// The base weight a kohya Flux or SD3 transformer module denotes, in the original checkpoint's
/// layout (`lora_unet_double_blocks_0_img_attn_qkv` → `double_blocks.0.img_attn.qkv.weight`), or
/// `None` when the name is not one (an SD UNet or text-encoder name stays for a base to resolve).
pub(crate) fn kohya_dit_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix("lora_unet_").or_else(|| name.strip_prefix("lycoris_"))?;
    let path = dotted(rest)?;
    let root = path.split('.').next()?;
    DIT_ROOTS.contains(&root).then(|| format!("{path}.weight"))
}

/// An underscored path read back with the DiT vocabulary, longest segment first; `None` when a
/// piece is neither a known segment nor a number.
fn dotted(underscored: &str) -> Option<String> {
    let pieces: Vec<&str> = underscored.split('_').collect();
    let mut out: Vec<String> = vec![];
    let mut i = 0;
    while i < pieces.len() {
        let longest = (1..=3.min(pieces.len() - i)).rev().find_map(|k| {
            let seg = pieces[i..i + k].join("_");
            let known = if k == 1 {
                DIT_WORDS.contains(&seg.as_str()) || seg.parse::<usize>().is_ok()
            } else {
                DIT_SEGMENTS.contains(&seg.as_str())
            };
            known.then_some((seg, k))
        });
        let (seg, k) = longest?;
        out.push(seg);
        i += k;
    }
    Some(out.join("."))
}

/// The XLabs processor LoRAs and the BFL weight each changes (x-flux `layers.py`).
const XLABS_TARGETS: &[(&str, &str)] = &[
    ("qkv_lora1", "img_attn.qkv"),
    ("proj_lora1", "img_attn.proj"),
    ("qkv_lora2", "txt_attn.qkv"),
    ("proj_lora2", "txt_attn.proj"),
    // Single blocks: q, k, v are the first 3·hidden rows of the fused linear1.
    ("qkv_lora", "linear1"),
    ("proj_lora", "linear2"),
];

/// An XLabs key (`[diffusion_model.]{double,single}_blocks.N.processor.X.{down,up}.weight`)
/// as (module name, role).
pub(crate) fn xlabs_key(key: &str) -> Option<(String, &'static str)> {
    let (module, role) = if let Some(m) = key.strip_suffix(".down.weight") {
        (m, "down")
    } else {
        (key.strip_suffix(".up.weight")?, "up")
    };
    xlabs_target(module)?;
    Some((module.to_string(), role))
}

/// The BFL base weight an XLabs module changes (`double_blocks.0.processor.qkv_lora1` →
/// `double_blocks.0.img_attn.qkv.weight`).
pub(crate) fn xlabs_target(module: &str) -> Option<String> {
    let rest = module.strip_prefix("diffusion_model.").unwrap_or(module);
    let mut parts = rest.split('.');
    let (blocks, n, processor, lora) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let double = match blocks {
        "double_blocks" => true,
        "single_blocks" => false,
        _ => return None,
    };
    if parts.next().is_some() || processor != "processor" || n.parse::<usize>().is_err() {
        return None;
    }
    let (_, target) = XLABS_TARGETS.iter().find(|(x, _)| *x == lora)?;
    // Numbered processors belong to double blocks, unnumbered ones to single blocks.
    (double == lora.ends_with(['1', '2'])).then(|| format!("{blocks}.{n}.{target}.weight"))
}

/// Why an XLabs module's ΔW is not the whole base weight, if it is not.
pub(crate) fn xlabs_partial(module: &str) -> Option<String> {
    let target = xlabs_target(module)?;
    target.ends_with("linear1.weight").then(|| {
        format!(
            "module {module}: XLabs single-block qkv_lora changes the q, k and v rows of {target} (the first \
             3·hidden rows of the fused weight), not the whole weight"
        )
    })
}

/// A note for adapters trained with sd-scripts' `split_qkv` (`ss_network_args`): training
/// scaled each of q, k, v (and the single blocks' MLP input) by alpha/r, but the saved file
/// merges them into one factor pair of rank 3r (4r in single blocks) with the same alpha, and
/// every loader (sd-scripts `create_network_from_weights`, ComfyUI, diffusers) scales that by
/// alpha/(3r); lorascope reports what loaders apply (lora_flux.py `state_dict`).
pub(crate) fn split_qkv_note(network_args: Option<&str>) -> Option<String> {
    let args: serde_json::Value = serde_json::from_str(network_args?).ok()?;
    let on = match args.get("split_qkv")? {
        serde_json::Value::String(s) => s.eq_ignore_ascii_case("true"),
        serde_json::Value::Bool(b) => *b,
        _ => false,
    };
    on.then(|| {
        "trained with split_qkv: sd-scripts scaled q, k and v each by alpha/r in training, but the file stores \
         them merged (rank 3r, 4r in single blocks) and loaders scale the merged pair by alpha/(stored rank), as \
         reported here"
            .to_string()
    })
}

/// Which of the two Flux/SD3 weight layouts a key or module name uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DitLayout {
    /// BFL/SAI original: fused q, k, v (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`,
    /// `joint_blocks.N.x_block.attn.qkv`).
    Original,
    /// diffusers: separate `attn.to_q`/`to_k`/`to_v` under `transformer_blocks`.
    Diffusers,
}

fn dit_layout(name: &str) -> Option<DitLayout> {
    if ["double_blocks", "single_blocks", "joint_blocks"].iter().any(|p| name.contains(p)) {
        return Some(DitLayout::Original);
    }
    // Only at the root of a transformer: an SD UNet has `….attentions.0.transformer_blocks`.
    let diffusers = name.contains("single_transformer_blocks")
        || name.starts_with("lora_transformer_")
        || name.starts_with("transformer_blocks.")
        || name.contains("transformer.transformer_blocks.");
    diffusers.then_some(DitLayout::Diffusers)
}

/// The explanation when modules that match nothing in the base use the other Flux/SD3 layout
/// than the base does: the two cannot be mapped one module to one weight, since the original
/// layout fuses q, k and v (and, in Flux's single blocks, the MLP input) into one weight.
pub(crate) fn layout_mismatch<'a>(base_keys: impl Iterator<Item = &'a str>, unmatched: &[&str]) -> Option<String> {
    let mut base = None;
    for k in base_keys {
        if let Some(l) = dit_layout(k) {
            base = Some(l);
            break;
        }
    }
    let base = base?;
    let other = unmatched.iter().find(|n| dit_layout(n).is_some_and(|l| l != base))?;
    Some(match base {
        DitLayout::Original => format!(
            "the adapter names modules in the diffusers transformer layout (e.g. {other}: separate \
             attn.to_q/to_k/to_v), but the base is in the original BFL/SAI layout, where q, k and v are one \
             fused weight (double_blocks.N.img_attn.qkv, single_blocks.N.linear1); each such module changes a \
             block of rows of a fused weight, which lorascope does not map: give the diffusers transformer \
             weights (transformer/diffusion_pytorch_model*.safetensors) as --base, or leave --base out"
        ),
        DitLayout::Diffusers => format!(
            "the adapter names modules in the original BFL/SAI layout (e.g. {other}: fused qkv), but the base \
             is in the diffusers transformer layout, where q, k and v are separate weights; a fused module's \
             ΔW spans several of them, which lorascope does not split: give the original checkpoint (e.g. \
             flux1-dev.safetensors) as --base, or leave --base out"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ranges_compress_runs() {
        let set = |v: &[usize]| v.iter().copied().collect();
        assert_eq!(layer_ranges(&set(&[24, 25, 26, 27, 28, 29])), "24–29");
        assert_eq!(layer_ranges(&set(&[0, 2, 5, 6, 7])), "0, 2, 5–7");
        assert_eq!(layer_ranges(&set(&[3])), "3");
    }

    #[test]
    fn kohya_flux_and_sd3_names_read_back_as_module_paths() {
        let k = |n: &str| kohya_dit_key(n);
        assert_eq!(k("lora_unet_double_blocks_0_img_attn_qkv").unwrap(), "double_blocks.0.img_attn.qkv.weight");
        assert_eq!(k("lora_unet_double_blocks_18_txt_mlp_2").unwrap(), "double_blocks.18.txt_mlp.2.weight");
        assert_eq!(k("lora_unet_double_blocks_3_img_mod_lin").unwrap(), "double_blocks.3.img_mod.lin.weight");
        assert_eq!(k("lora_unet_single_blocks_37_linear1").unwrap(), "single_blocks.37.linear1.weight");
        assert_eq!(k("lora_unet_single_blocks_0_modulation_lin").unwrap(), "single_blocks.0.modulation.lin.weight");
        assert_eq!(k("lora_unet_time_in_in_layer").unwrap(), "time_in.in_layer.weight");
        assert_eq!(k("lora_unet_final_layer_adaLN_modulation_1").unwrap(), "final_layer.adaLN_modulation.1.weight");
        assert_eq!(
            k("lora_unet_joint_blocks_5_context_block_attn_qkv").unwrap(),
            "joint_blocks.5.context_block.attn.qkv.weight"
        );
        assert_eq!(k("lora_unet_joint_blocks_0_x_block_mlp_fc1").unwrap(), "joint_blocks.0.x_block.mlp.fc1.weight");
        // SD UNet and text-encoder names are left for a base to resolve.
        assert_eq!(k("lora_unet_down_blocks_0_attentions_0_proj_in"), None);
        assert_eq!(k("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"), None);
        assert_eq!(k("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"), None);
        assert_eq!(k("lora_unet_double_blocks_0_img_attn_bogus"), None);
    }

    #[test]
    fn xlabs_processors_map_to_the_weights_they_change() {
        let t = |n: &str| xlabs_target(n);
        assert_eq!(t("double_blocks.0.processor.qkv_lora1").unwrap(), "double_blocks.0.img_attn.qkv.weight");
        assert_eq!(t("double_blocks.7.processor.proj_lora2").unwrap(), "double_blocks.7.txt_attn.proj.weight");
        assert_eq!(
            t("diffusion_model.double_blocks.1.processor.qkv_lora2").unwrap(),
            "double_blocks.1.txt_attn.qkv.weight"
        );
        assert_eq!(t("single_blocks.3.processor.proj_lora").unwrap(), "single_blocks.3.linear2.weight");
        assert_eq!(t("single_blocks.3.processor.qkv_lora1"), None);
        assert_eq!(t("double_blocks.3.processor.qkv_lora"), None);
        assert!(xlabs_partial("single_blocks.3.processor.qkv_lora").unwrap().contains("single_blocks.3.linear1"));
        assert_eq!(xlabs_key("double_blocks.0.processor.qkv_lora1.up.weight").unwrap().1, "up");
        assert_eq!(xlabs_key("double_blocks.0.img_attn.qkv.up.weight"), None);
    }

    #[test]
    fn split_qkv_is_noted() {
        assert!(split_qkv_note(Some(r#"{"split_qkv": "True", "train_t5xxl": "False"}"#)).is_some());
        assert!(split_qkv_note(Some(r#"{"split_qkv": "False"}"#)).is_none());
        assert!(split_qkv_note(Some("not json")).is_none());
        assert!(split_qkv_note(None).is_none());
    }

    #[test]
    fn the_two_flux_layouts_are_told_apart() {
        let bfl = ["double_blocks.0.img_attn.qkv.weight"];
        let diffusers = ["transformer_blocks.0.attn.to_q.weight"];
        let d_name = ["transformer.single_transformer_blocks.0.attn.to_q"];
        let k_name = ["lora_unet_double_blocks_0_img_attn_qkv"];
        assert!(layout_mismatch(bfl.into_iter(), &d_name).unwrap().contains("diffusers transformer layout"));
        assert!(layout_mismatch(diffusers.into_iter(), &k_name).unwrap().contains("original BFL/SAI layout"));
        assert_eq!(layout_mismatch(bfl.into_iter(), &k_name), None);
        // An SD UNet's transformer blocks are neither.
        assert_eq!(dit_layout("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"), None);
        assert_eq!(dit_layout("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"), None);
    }
}
