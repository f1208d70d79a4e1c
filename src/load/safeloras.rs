//! cloneofsimo `lora_diffusion` "safeloras" files: which keys they use and which base weight each
//! positional module changes.
//!
//! Source: cloneofsimo/lora `lora_diffusion/lora.py` (`save_safeloras_with_embeds`,
//! `parse_safeloras`, `_find_modules_v2`, `extract_lora_as_tensor`). Keys are
//! `{component}:{i}:up` / `{component}:{i}:down`; metadata `{component}` holds the JSON list of
//! module classes LoRA was injected under (`["CrossAttention", "Attention", "GEGLU"]` by default
//! for the UNet, `["CLIPAttention"]` for the text encoder) and `{component}:{i}:rank` the rank;
//! a key whose metadata value is `<embed>` is a textual-inversion token embedding stored beside
//! the LoRA. `realize_as_lora` folds the layer's scale into `up` before saving, and the loader
//! applies `up·down` with scale 1, so ΔW = up·down.
//!
//! The file does not say which weight module `i` changes: `i` is the position of the layer in
//! the walk `_find_modules_v2` makes, every module of a target class in `model.modules()` order
//! and, inside it, every `nn.Linear` in `named_modules()` order. For the SD 1.x/2.x UNet that
//! walk is: `down_blocks`, `up_blocks`, then `mid_block` (diffusers registers `up_blocks` as an
//! empty list before it creates `mid_block`, `unet_2d_condition.py`), and in each transformer
//! block `attn1.{to_q,to_k,to_v,to_out.0}`, `attn2.{…}` and the GEGLU `ff.net.0.proj` — after
//! `attn2` in diffusers ≥ 0.12, between `attn1` and `attn2` in the diffusers of late 2022
//! (`BasicTransformerBlock` registered `attn1`, `ff`, `attn2`). The GEGLU's shape tells the two
//! apart. For CLIP (transformers `CLIPAttention`) the walk is `k_proj`, `v_proj`, `q_proj`,
//! `out_proj` per layer. Only a sequence whose count and shapes fit these walks is named; any
//! other (extended targets with ResnetBlock2D, other models) keeps positional names, with a
//! warning, rather than a guess.

/// The metadata value that marks a textual-inversion embedding.
pub(crate) const EMBED_FLAG: &str = "<embed>";

/// (component, index, role) of a safeloras key such as `unet:12:down`.
pub(crate) fn split(key: &str) -> Option<(&str, usize, &'static str)> {
    let mut parts = key.split(':');
    let (component, index, dir) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || component.is_empty()
        || !component.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return None;
    }
    // Digits only: `parse` would also take a sign.
    if index.is_empty() || index.len() > 9 || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let role = match dir {
        "up" => "up",
        "down" => "down",
        _ => return None,
    };
    Some((component, index.parse().ok()?, role))
}

/// The module name lorascope gives the `i`-th layer of a component (`unet:12`).
pub(crate) fn module_name(component: &str, index: usize) -> String {
    format!("{component}:{index}")
}

/// The transformer blocks of the SD 1.x/2.x UNet in the walk's order, each with its width level
/// (0 = the first down block's width); every one holds a single `transformer_blocks.0`.
const SD_UNET_BLOCKS: &[(&str, usize)] = &[
    ("down_blocks.0.attentions.0", 0),
    ("down_blocks.0.attentions.1", 0),
    ("down_blocks.1.attentions.0", 1),
    ("down_blocks.1.attentions.1", 1),
    ("down_blocks.2.attentions.0", 2),
    ("down_blocks.2.attentions.1", 2),
    ("up_blocks.1.attentions.0", 2),
    ("up_blocks.1.attentions.1", 2),
    ("up_blocks.1.attentions.2", 2),
    ("up_blocks.2.attentions.0", 1),
    ("up_blocks.2.attentions.1", 1),
    ("up_blocks.2.attentions.2", 1),
    ("up_blocks.3.attentions.0", 0),
    ("up_blocks.3.attentions.1", 0),
    ("up_blocks.3.attentions.2", 0),
    ("mid_block.attentions.0", 2),
];

const ATTENTION_PROJECTIONS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
/// transformers' `CLIPAttention` registers its projections in this order.
const CLIP_PROJECTIONS: [&str; 4] = ["k_proj", "v_proj", "q_proj", "out_proj"];

/// The diffusers module path (with its `unet.`/`text_encoder.` prefix) of every layer of one
/// component, in index order, given the target classes from the metadata and each layer's ΔW
/// shape `[out, in, …]`; `Err` says why the layers do not fit a known walk.
pub(crate) fn module_paths(component: &str, targets: &[String], shapes: &[Vec<usize>]) -> Result<Vec<String>, String> {
    if shapes.iter().any(|s| s.len() != 2) {
        return Err("it has convolution layers (extended targets), whose order lorascope does not know".into());
    }
    let pairs: Vec<(usize, usize)> = shapes.iter().map(|s| (s[0], s[1])).collect();
    let only = |allowed: &[&str]| targets.iter().all(|t| allowed.contains(&t.as_str()));
    match component {
        "unet" if only(&["CrossAttention", "Attention", "GEGLU"]) => {
            let geglu = targets.iter().any(|t| t == "GEGLU");
            let attention = targets.iter().any(|t| t == "CrossAttention" || t == "Attention");
            unet_paths(&pairs, attention, geglu)
        }
        "text_encoder" if only(&["CLIPAttention"]) && !targets.is_empty() => clip_paths(&pairs),
        _ => Err(format!("its targets {targets:?} under component {component:?} are not a walk lorascope knows")),
    }
}

fn clip_paths(pairs: &[(usize, usize)]) -> Result<Vec<String>, String> {
    let width = pairs.first().map(|p| p.0).unwrap_or(0);
    if pairs.is_empty() || !pairs.len().is_multiple_of(4) || pairs.iter().any(|&(o, i)| o != width || i != width) {
        return Err(format!(
            "{} layers do not make CLIP attention layers of four square projections each",
            pairs.len()
        ));
    }
    Ok((0..pairs.len())
        .map(|i| format!("text_encoder.text_model.encoder.layers.{}.self_attn.{}", i / 4, CLIP_PROJECTIONS[i % 4]))
        .collect())
}

/// One transformer block's layers in walk order, as suffixes after `transformer_blocks.0.`.
fn block_suffixes(attention: bool, geglu_first: Option<bool>) -> Vec<String> {
    let attn = |a: &str| ATTENTION_PROJECTIONS.iter().map(|p| format!("{a}.{p}")).collect::<Vec<_>>();
    let ff = vec!["ff.net.0.proj".to_string()];
    match (attention, geglu_first) {
        (true, None) => [attn("attn1"), attn("attn2")].concat(),
        (true, Some(true)) => [attn("attn1"), ff, attn("attn2")].concat(),
        (true, Some(false)) => [attn("attn1"), attn("attn2"), ff].concat(),
        (false, _) => ff,
    }
}

fn unet_paths(pairs: &[(usize, usize)], attention: bool, geglu: bool) -> Result<Vec<String>, String> {
    let per_block = 8 * usize::from(attention) + usize::from(geglu);
    if per_block == 0 || pairs.len() != per_block * SD_UNET_BLOCKS.len() {
        return Err(format!(
            "{} layers do not fit the SD 1.x/2.x UNet ({} transformer blocks × {per_block} layers)",
            pairs.len(),
            SD_UNET_BLOCKS.len()
        ));
    }
    let mut widths: [Option<usize>; 3] = [None; 3];
    let mut out = Vec::with_capacity(pairs.len());
    for (b, &(block, level)) in SD_UNET_BLOCKS.iter().enumerate() {
        let layers = &pairs[b * per_block..(b + 1) * per_block];
        let (width, geglu_first) = read_block(layers, attention, geglu).map_err(|e| format!("{block}: {e}"))?;
        if *widths[level].get_or_insert(width) != width {
            return Err(format!(
                "{block} is {width} wide where the blocks of its level are {}",
                widths[level].unwrap_or(0)
            ));
        }
        out.extend(
            block_suffixes(attention, geglu_first)
                .into_iter()
                .map(|s| format!("unet.{block}.transformer_blocks.0.{s}")),
        );
    }
    Ok(out)
}

/// The width of one transformer block's layers and, with a GEGLU, whether it comes before
/// `attn2`; `Err` when the shapes are not those of attention projections and a GEGLU.
fn read_block(layers: &[(usize, usize)], attention: bool, geglu: bool) -> Result<(usize, Option<bool>), String> {
    if !attention {
        return Ok((layers[0].1, Some(false)));
    }
    let width = attention_width(&layers[0..4])?;
    let geglu_first = if geglu {
        // The GEGLU reads the block's width and widens it; attn2's to_q reads the same width
        // but keeps the attention's inner width.
        let inner = layers[0].0;
        let first = layers[4].1 == width && layers[4].0 != inner;
        let (ff, attn2) = if first { (layers[4], &layers[5..9]) } else { (layers[8], &layers[4..8]) };
        if ff.1 != width || ff.0 == inner {
            return Err(format!("no GEGLU projection from width {width} where one is expected"));
        }
        if attention_width(attn2)? != width {
            return Err("attn1 and attn2 differ in width".into());
        }
        Some(first)
    } else {
        if attention_width(&layers[4..8])? != width {
            return Err("attn1 and attn2 differ in width".into());
        }
        None
    };
    Ok((width, geglu_first))
}

/// The width of four layers that are an attention's q, k, v and out projections.
fn attention_width(l: &[(usize, usize)]) -> Result<usize, String> {
    let [q, k, v, o] = [l[0], l[1], l[2], l[3]];
    let inner = q.0;
    if k.0 != inner || v.0 != inner || k.1 != v.1 || o.1 != inner || o.0 != q.1 {
        return Err(format!("shapes {l:?} are not an attention's q, k, v, out projections"));
    }
    Ok(q.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_component_index_and_role() {
        assert_eq!(split("unet:12:down"), Some(("unet", 12, "down")));
        assert_eq!(split("text_encoder:0:up"), Some(("text_encoder", 0, "up")));
        for bad in ["unet:+1:up", "unet:1:mid", "unet:1", ":1:up", "unet:1:up:x", "<s1>", "a.b:1:up"] {
            assert_eq!(split(bad), None, "{bad}");
        }
    }

    #[test]
    fn clip_layers_are_named_in_registration_order() {
        let p = clip_paths(&[(8, 8); 8]).unwrap();
        assert_eq!(p[0], "text_encoder.text_model.encoder.layers.0.self_attn.k_proj");
        assert_eq!(p[2], "text_encoder.text_model.encoder.layers.0.self_attn.q_proj");
        assert_eq!(p[7], "text_encoder.text_model.encoder.layers.1.self_attn.out_proj");
        assert!(clip_paths(&[(8, 8); 6]).is_err());
    }
}
