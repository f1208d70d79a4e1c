//! Which SD base this is and how to run it: a diffusers pipeline directory (configs from its
//! JSON files) or a single-file original-LDM checkpoint (configs inferred from tensor shapes,
//! helped by the configs of the pipeline whose `tokenizer/` folder `--tokenizer` names); SDXL
//! and everything that is not SD 1.x/2.x refused with what is missing. The rules are listed in
//! docs/image-runtime.md.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::config::{
    ClipConfig, Json, SdFamily, SdLayout, TextLayout, UnetConfig, VaeConfig, LDM_CLIP, LDM_OPENCLIP, LDM_UNET, LDM_VAE,
    SDXL_REFUSED,
};
use super::schedule::{NoiseSchedule, Prediction};
use super::tokenizer::{ClipTokenizer, TokenizerFiles};
use super::weights::KeyMap;
use crate::error::{Error, Result};
use crate::load::base::{read_small_files, TOKENIZER_FILES};
use crate::load::fsguard::{is_entry, Tree};
use crate::load::{BaseKind, BaseModel, FileDigest};

/// How to run one base.
pub(crate) struct Plan {
    pub layout: SdLayout,
    pub family: SdFamily,
    pub unet: UnetConfig,
    pub vae: VaeConfig,
    pub clip: ClipConfig,
    pub schedule: NoiseSchedule,
    pub map: KeyMap,
    pub config_source: String,
    pub tokenizer: ClipTokenizer,
    pub tokenizer_source: String,
    /// Files read besides the base's own (a `--tokenizer` folder, the configs beside it).
    pub extra_files: Vec<(PathBuf, FileDigest)>,
}

/// What the caller may say about a base beyond its files.
#[derive(Debug, Clone, Default)]
pub struct SdOptions {
    /// A CLIP tokenizer folder (vocab.json + merges.txt, or tokenizer.json): required for a
    /// single-file checkpoint, replaces a pipeline's own `tokenizer/` when given.
    pub tokenizer_dir: Option<PathBuf>,
    /// The UNet's prediction type when the base does not say (single files record none).
    pub prediction: Option<Prediction>,
}

fn parse_json(path: &Path, bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| Error::read(path, "invalid JSON", e))
}

/// The text encoder layout of a single-file checkpoint, if it has one.
fn text_layout(base: &BaseModel) -> Option<TextLayout> {
    let tok = "embeddings.token_embedding.weight";
    for prefix in [format!("{LDM_CLIP}text_model."), LDM_CLIP.to_string()] {
        if base.shape(&format!("{prefix}{tok}")).is_some() {
            return Some(TextLayout::Hf { prefix });
        }
    }
    base.shape(&format!("{LDM_OPENCLIP}token_embedding.weight")).is_some().then_some(TextLayout::OpenClip)
}

fn has_prefix(base: &BaseModel, prefix: &str) -> bool {
    base.keys().any(|k| k.starts_with(prefix))
}

/// Whether `base` is something the SD runtime can run, and if not, why (an input error naming
/// the base). Reads only key names and the pipeline's configs, never tensors.
pub(crate) fn check(base: &BaseModel) -> Result<SdLayout> {
    let refuse = |why: String| Err(Error::input(&base.path, why));
    match base.kind {
        BaseKind::DiffusersPipeline => {
            let unet_cfg = base.pipeline_file("unet/config.json");
            let sdxl_unet = match unet_cfg {
                Some((p, b)) => parse_json(p, b)?.get("addition_embed_type").is_some_and(|v| !v.is_null()),
                None => false,
            };
            if sdxl_unet
                || has_prefix(base, "text_encoder_2.")
                || base.pipeline_file("text_encoder_2/config.json").is_some()
            {
                return refuse(format!("this pipeline is {SDXL_REFUSED}"));
            }
            if has_prefix(base, "transformer.") {
                return refuse(
                    "a diffusion-transformer pipeline (SD3, Flux), which the image runtime does not run: it runs \
                     SD 1.x and 2.x UNet pipelines"
                        .into(),
                );
            }
            let mut missing = vec![];
            for (file, prefix, what) in [
                ("unet/config.json", "unet.", "unet/"),
                ("vae/config.json", "vae.", "vae/"),
                ("text_encoder/config.json", "text_encoder.", "text_encoder/"),
            ] {
                if base.pipeline_file(file).is_none() || !has_prefix(base, prefix) {
                    missing.push(format!("{what} (config.json and safetensors weights)"));
                }
            }
            if !missing.is_empty() {
                return refuse(format!(
                    "a Stable Diffusion pipeline needs unet/, vae/ and text_encoder/ with config.json and weights; \
                     missing: {}",
                    missing.join(", ")
                ));
            }
            Ok(SdLayout::DiffusersDir)
        }
        BaseKind::Safetensors => {
            if has_prefix(base, "conditioner.embedders.1.") || has_prefix(base, &format!("{LDM_UNET}label_emb.")) {
                return refuse(format!("this checkpoint is {SDXL_REFUSED}"));
            }
            let mut missing = vec![];
            if base.shape(&format!("{LDM_UNET}input_blocks.0.0.weight")).is_none() {
                missing.push("the UNet (model.diffusion_model.*)");
            }
            if base.shape(&format!("{LDM_VAE}encoder.conv_in.weight")).is_none() {
                missing.push("the VAE (first_stage_model.*)");
            }
            if text_layout(base).is_none() {
                missing.push("the text encoder (cond_stage_model.transformer.* or cond_stage_model.model.*)");
            }
            if !missing.is_empty() {
                return refuse(format!(
                    "not a runnable Stable Diffusion checkpoint: a single-file original-LDM checkpoint holds the UNet, \
                     the VAE and the text encoder; this one lacks {}",
                    missing.join(", ")
                ));
            }
            Ok(SdLayout::SingleFile)
        }
        BaseKind::HfDirectory | BaseKind::Gguf => refuse(
            "a text model, not a Stable Diffusion base (a diffusers pipeline directory or a single-file SD 1.x/2.x \
             checkpoint)"
                .into(),
        ),
    }
}

/// The files of a tokenizer folder the user named.
fn read_tokenizer_dir(dir: &Path) -> Result<(TokenizerFiles, Vec<(PathBuf, FileDigest)>)> {
    if !dir.is_dir() {
        return Err(Error::input(dir, "--tokenizer: not a directory (a folder with vocab.json and merges.txt)"));
    }
    let tree = Tree::named(dir, "the tokenizer directory")?;
    let files = read_small_files(dir, &tree, TOKENIZER_FILES)?;
    let digests = files.values().map(|(p, _, d)| (p.clone(), d.clone())).collect();
    Ok((files.into_iter().map(|(k, (p, b, _))| (k, (p, b))).collect(), digests))
}

/// The pipeline's own tokenizer files.
fn pipeline_tokenizer(base: &BaseModel) -> TokenizerFiles {
    TOKENIZER_FILES
        .iter()
        .filter_map(|n| {
            base.pipeline_file(&format!("tokenizer/{n}")).map(|(p, b)| (n.to_string(), (p.to_path_buf(), b.to_vec())))
        })
        .collect()
}

/// How the tokenizer is described in the model's info: the folder it came from.
fn folder_of(files: &TokenizerFiles, fallback: &Path) -> String {
    files.values().next().and_then(|(p, _)| p.parent()).unwrap_or(fallback).display().to_string()
}

pub(crate) fn plan(base: &BaseModel, opts: &SdOptions) -> Result<Plan> {
    match check(base)? {
        SdLayout::DiffusersDir => plan_pipeline(base, opts),
        SdLayout::SingleFile => plan_single(base, opts),
    }
}

fn config<'a>(base: &'a BaseModel, rel: &str) -> Result<(&'a Path, Value)> {
    let (p, b) =
        base.pipeline_file(rel).ok_or_else(|| Error::input(&base.path, format!("the pipeline has no {rel}")))?;
    Ok((p, parse_json(p, b)?))
}

fn plan_pipeline(base: &BaseModel, opts: &SdOptions) -> Result<Plan> {
    let (up, uv) = config(base, "unet/config.json")?;
    let unet = UnetConfig::from_diffusers(&Json::parse(up, &uv)?)?;
    let (vp, vv) = config(base, "vae/config.json")?;
    let vae = VaeConfig::from_diffusers(&Json::parse(vp, &vv)?)?;
    let (tp, tv) = config(base, "text_encoder/config.json")?;
    let clip = ClipConfig::from_hf(&Json::parse(tp, &tv)?)?;
    let mut schedule = match base.pipeline_file("scheduler/scheduler_config.json") {
        Some((p, b)) => NoiseSchedule::from_diffusers(&Json::parse(p, &parse_json(p, b)?)?)?,
        None => NoiseSchedule::sd15(Prediction::Epsilon),
    };
    if let Some(p) = opts.prediction {
        schedule.prediction = p;
    }
    let (files, extra, source) = match &opts.tokenizer_dir {
        Some(d) => {
            let (f, digests) = read_tokenizer_dir(d)?;
            (f, digests, d.display().to_string())
        }
        None => {
            let f = pipeline_tokenizer(base);
            let source = folder_of(&f, &base.path.join("tokenizer"));
            (f, vec![], source)
        }
    };
    if files.is_empty() {
        return Err(Error::input(
            &base.path,
            "the pipeline has no tokenizer/ (vocab.json and merges.txt): give --tokenizer DIR, a CLIP tokenizer folder",
        ));
    }
    let tok_dir = opts.tokenizer_dir.clone().unwrap_or_else(|| base.path.join("tokenizer"));
    let tokenizer = ClipTokenizer::from_files(&tok_dir, &files, clip.positions)?;
    let family = family(&unet, &clip, None);
    Ok(Plan {
        layout: SdLayout::DiffusersDir,
        family,
        unet,
        vae,
        clip,
        schedule,
        map: KeyMap::Pipeline,
        config_source: "diffusers config files (unet/, vae/, text_encoder/ config.json)".into(),
        tokenizer,
        tokenizer_source: source,
        extra_files: extra,
    })
}

/// SD 2.x has OpenCLIP ViT-H's 1024-wide context; everything else runs as SD 1.x.
fn family(unet: &UnetConfig, _clip: &ClipConfig, text: Option<&TextLayout>) -> SdFamily {
    if unet.cross_attention_dim == 1024 || text == Some(&TextLayout::OpenClip) {
        SdFamily::Sd2
    } else {
        SdFamily::Sd1
    }
}

/// The configs of the diffusers pipeline whose `tokenizer/` folder is `dir`, when its parent
/// holds model_index.json: each parsed, or `None` when absent.
struct Companion {
    dir: PathBuf,
    unet: Option<UnetConfig>,
    vae: Option<VaeConfig>,
    clip: Option<ClipConfig>,
    schedule: Option<NoiseSchedule>,
    files: Vec<(PathBuf, FileDigest)>,
}

fn companion(tokenizer_dir: &Path) -> Result<Option<Companion>> {
    let Some(parent) = std::fs::canonicalize(tokenizer_dir).ok().and_then(|p| p.parent().map(Path::to_path_buf)) else {
        return Ok(None);
    };
    if !is_entry(&parent.join("model_index.json")) {
        return Ok(None);
    }
    let tree = Tree::named(&parent, "the pipeline directory beside --tokenizer")?;
    let names = ["unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"];
    let read = read_small_files(&parent, &tree, &names)?;
    let mut c = Companion { dir: parent, unet: None, vae: None, clip: None, schedule: None, files: vec![] };
    for (name, (p, bytes, d)) in &read {
        let v = parse_json(p, bytes)?;
        let j = Json::parse(p, &v)?;
        match name.as_str() {
            "unet/config.json" => c.unet = Some(UnetConfig::from_diffusers(&j)?),
            "vae/config.json" => c.vae = Some(VaeConfig::from_diffusers(&j)?),
            "text_encoder/config.json" => c.clip = Some(ClipConfig::from_hf(&j)?),
            _ => c.schedule = Some(NoiseSchedule::from_diffusers(&j)?),
        }
        c.files.push((p.clone(), d.clone()));
    }
    Ok(Some(c))
}

/// Infer with `known`'s help when it describes the same shapes, else from the shapes alone;
/// says whether `known` was used.
fn infer<C: Clone>(
    known: Option<&C>,
    with: impl Fn(Option<&C>) -> Result<C>,
    same: impl Fn(&C, &C) -> bool,
) -> Result<(C, bool)> {
    if let Some(k) = known {
        if let Ok(c) = with(Some(k)) {
            if same(&c, k) {
                return Ok((c, true));
            }
        }
    }
    Ok((with(None)?, false))
}

fn plan_single(base: &BaseModel, opts: &SdOptions) -> Result<Plan> {
    let Some(tok_dir) = &opts.tokenizer_dir else {
        return Err(Error::input(
            &base.path,
            "a single-file checkpoint carries no tokenizer: give --tokenizer DIR, a folder with vocab.json and \
             merges.txt (e.g. the tokenizer/ folder of the matching diffusers pipeline)",
        ));
    };
    let text = text_layout(base).expect("checked");
    let comp = companion(tok_dir)?;
    let c = comp.as_ref();
    // A `v_pred` key marks v-prediction checkpoints (ComfyUI's model_detection.py convention).
    let prediction = opts
        .prediction
        .or_else(|| c.and_then(|c| c.schedule.as_ref()).map(|s| s.prediction))
        .unwrap_or(if base.shape("v_pred").is_some() { Prediction::V } else { Prediction::Epsilon });
    let mut schedule = c.and_then(|c| c.schedule.clone()).unwrap_or_else(|| NoiseSchedule::sd15(prediction));
    schedule.prediction = prediction;
    // SD 2.x's v-prediction models work at 768 pixels, the rest at 512.
    let side = if prediction == Prediction::V { 768 } else { 512 };
    let (vae, vae_known) =
        infer(c.and_then(|c| c.vae.as_ref()), |k| VaeConfig::from_ldm(base, k, side), VaeConfig::same_shapes)?;
    let latent_side = (vae.sample_size >> vae.downsamplings()).max(1);
    let (unet, unet_known) = infer(
        c.and_then(|c| c.unet.as_ref()),
        |k| UnetConfig::from_ldm(base, k, latent_side),
        UnetConfig::same_shapes,
    )?;
    let (clip, clip_known) =
        infer(c.and_then(|c| c.clip.as_ref()), |k| ClipConfig::from_ldm(base, &text, k), ClipConfig::same_shapes)?;
    let (files, mut extra) = read_tokenizer_dir(tok_dir)?;
    let tokenizer = ClipTokenizer::from_files(tok_dir, &files, clip.positions)?;
    let mut config_source = "inferred from tensor shapes".to_string();
    if let Some(c) = c {
        extra.extend(c.files.iter().cloned());
        let mut used = vec![];
        for (ok, what) in [(unet_known, "unet/"), (vae_known, "vae/"), (clip_known, "text_encoder/")] {
            if ok {
                used.push(what);
            }
        }
        if c.schedule.is_some() {
            used.push("scheduler/");
        }
        if !used.is_empty() {
            config_source += &format!(
                "; what shapes do not show (norm groups, heads, activation, sample size, scaling, schedule) from {} \
                 config.json of {}",
                used.join(", "),
                c.dir.display()
            );
        }
    }
    if c.is_none_or(|c| c.schedule.is_none()) {
        config_source += "; schedule: SD 1.5 defaults";
    }
    let family = family(&unet, &clip, Some(&text));
    let map = KeyMap::Ldm { layers_per_block: unet.layers_per_block, vae_levels: vae.channels.len(), text };
    Ok(Plan {
        layout: SdLayout::SingleFile,
        family,
        unet,
        vae,
        clip,
        schedule,
        map,
        config_source,
        tokenizer,
        tokenizer_source: tok_dir.display().to_string(),
        extra_files: extra,
    })
}
