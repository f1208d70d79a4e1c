//! The Stable Diffusion runtime (src/model/sd): shapes and agreement between a diffusers
//! pipeline and the same weights as a single-file LDM checkpoint (written here with a name
//! table of its own, after scripts/make-sd-fixture.py), merges against dense references
//! computed with plain loops, refusals of bad bases and adapters; and, on fixtures/sd-micro,
//! every output against the values diffusers/transformers stored (skipped, with a note, when
//! that fixture is absent).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lorascope::fixtures::{Rng, SafetensorsBuilder, SdPipelineSpec};
use lorascope::load::LoadOptions;
use lorascope::model::{is_sd_base, SdFamily, SdLayout, SdModel};
use lorascope::{BaseModel, Error};
use safetensors::Dtype;

type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max |a − b| and max |b|.
fn diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (vals(a), vals(b));
    let d = a.iter().zip(&b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max);
    let m = b.iter().map(|y| (*y as f64).abs()).fold(0.0, f64::max);
    (d, m)
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, rel: f64) -> f64 {
    let (d, m) = diff(a, b);
    println!("{what}: max abs diff {d:.3e}, max |reference| {m:.3e}, ratio {:.3e}", d / m.max(1e-30));
    assert!(d <= rel * m, "{what}: max abs diff {d:e} > {rel:e} × {m:e}");
    d
}

fn assert_same(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}");
    assert!(vals(a) == vals(b), "{what}: not bit-identical (max diff {:e})", diff(a, b).0);
}

fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
}

fn uniform(rng: &mut Rng, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.uniform() as f32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
}

fn input_error(r: Result<impl std::fmt::Debug, Error>, path: &Path) -> String {
    match r {
        Err(Error::Input { path: p, reason }) => {
            assert_eq!(p, path, "the error names {} ({reason})", p.display());
            reason
        }
        other => panic!("expected an input error naming {}: {other:?}", path.display()),
    }
}

fn load(base: &Path, tok: Option<&Path>) -> SdModel {
    SdModel::load(&BaseModel::open(base).unwrap(), tok, &Device::Cpu).unwrap()
}

/// The micro pipeline with random weights under `dir/pipeline`.
fn micro(dir: &Path, seed: u64) -> (SdPipelineSpec, Weights, PathBuf) {
    let spec = SdPipelineSpec::micro();
    let w = spec.random_weights(seed).unwrap();
    let p = dir.join("pipeline");
    spec.write(&p, &w).unwrap();
    (spec, w, p)
}

// ------------------------------------------------------------------------------------------
// diffusers → original-LDM names, written out as scripts/make-sd-fixture.py's tables do
// (diffusers' convert_diffusers_to_original_stable_diffusion.py, any level count).
// ------------------------------------------------------------------------------------------

fn unet_table(levels: usize, l: usize, down_attn: &[bool], up_attn: &[bool]) -> Vec<(String, String)> {
    let mut m: Vec<(String, String)> = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("middle_block.0.", "mid_block.resnets.0."),
        ("middle_block.1.", "mid_block.attentions.0."),
        ("middle_block.2.", "mid_block.resnets.1."),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    for i in 0..levels {
        for j in 0..l {
            m.push((format!("input_blocks.{}.0.", i * (l + 1) + j + 1), format!("down_blocks.{i}.resnets.{j}.")));
            if down_attn[i] {
                m.push((
                    format!("input_blocks.{}.1.", i * (l + 1) + j + 1),
                    format!("down_blocks.{i}.attentions.{j}."),
                ));
            }
        }
        if i + 1 < levels {
            m.push((
                format!("input_blocks.{}.0.op.", (i + 1) * (l + 1)),
                format!("down_blocks.{i}.downsamplers.0.conv."),
            ));
        }
        for j in 0..=l {
            m.push((format!("output_blocks.{}.0.", i * (l + 1) + j), format!("up_blocks.{i}.resnets.{j}.")));
            if up_attn[i] {
                m.push((format!("output_blocks.{}.1.", i * (l + 1) + j), format!("up_blocks.{i}.attentions.{j}.")));
            }
        }
        if i + 1 < levels {
            let k = if up_attn[i] { 2 } else { 1 };
            m.push((format!("output_blocks.{}.{k}.", i * (l + 1) + l), format!("up_blocks.{i}.upsamplers.0.")));
        }
    }
    m
}

const UNET_RESNET: &[(&str, &str)] = &[
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
];

fn vae_table(levels: usize, l: usize) -> Vec<(String, String)> {
    let mut m = vec![
        ("encoder.norm_out.".to_string(), "encoder.conv_norm_out.".to_string()),
        ("decoder.norm_out.".into(), "decoder.conv_norm_out.".into()),
    ];
    for part in ["encoder", "decoder"] {
        m.push((format!("{part}.mid.attn_1."), format!("{part}.mid_block.attentions.0.")));
        for j in 0..2 {
            m.push((format!("{part}.mid.block_{}.", j + 1), format!("{part}.mid_block.resnets.{j}.")));
        }
    }
    for i in 0..levels {
        for j in 0..l {
            m.push((format!("encoder.down.{i}.block.{j}."), format!("encoder.down_blocks.{i}.resnets.{j}.")));
        }
        if i + 1 < levels {
            m.push((format!("encoder.down.{i}.downsample."), format!("encoder.down_blocks.{i}.downsamplers.0.")));
            m.push((
                format!("decoder.up.{}.upsample.", levels - 1 - i),
                format!("decoder.up_blocks.{i}.upsamplers.0."),
            ));
        }
        for j in 0..=l {
            m.push((
                format!("decoder.up.{}.block.{j}.", levels - 1 - i),
                format!("decoder.up_blocks.{i}.resnets.{j}."),
            ));
        }
    }
    m
}

const VAE_ATTN: &[(&str, &str)] =
    &[("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")];

/// The micro pipeline's weights as one original-LDM checkpoint.
fn to_ldm(w: &Weights) -> SafetensorsBuilder {
    let unet = unet_table(2, 1, &[true, false], &[false, true]);
    let vae = vae_table(3, 1);
    let mut b = SafetensorsBuilder::new();
    for (k, (shape, v)) in w {
        let (name, shape) = if let Some(rest) = k.strip_prefix("unet.") {
            let (ldm, hf) = unet.iter().find(|(_, hf)| rest.starts_with(hf.as_str())).unwrap_or_else(|| panic!("{k}"));
            let mut tail = rest[hf.len()..].to_string();
            if hf.contains(".resnets.") {
                if let Some((l, d)) = UNET_RESNET.iter().find(|(_, d)| tail.starts_with(&format!("{d}."))) {
                    tail = format!("{l}{}", &tail[d.len()..]);
                }
            }
            (format!("model.diffusion_model.{ldm}{tail}"), shape.clone())
        } else if let Some(rest) = k.strip_prefix("vae.") {
            let mut shape = shape.clone();
            let name = match vae.iter().find(|(_, hf)| rest.starts_with(hf.as_str())) {
                Some((ldm, hf)) => {
                    let mut tail = rest[hf.len()..].to_string();
                    if hf.contains(".attentions.") {
                        let (l, d) = VAE_ATTN.iter().find(|(_, d)| tail.starts_with(d)).unwrap();
                        tail = format!("{l}{}", &tail[d.len()..]);
                        if *l != "norm." && tail.ends_with("weight") {
                            shape.extend([1, 1]);
                        }
                    }
                    format!("{ldm}{tail}")
                }
                None => rest.to_string(),
            };
            (format!("first_stage_model.{}", name.replace("conv_shortcut", "nin_shortcut")), shape)
        } else {
            let rest = k.strip_prefix("text_encoder.").unwrap();
            (format!("cond_stage_model.transformer.{rest}"), shape.clone())
        };
        b.add(&name, &shape, v, Dtype::F32);
    }
    b
}

// ------------------------------------------------------------------------------------------
// Synthetic bases
// ------------------------------------------------------------------------------------------

struct Outputs {
    text: Tensor,
    unet: Tensor,
    mean: Tensor,
    decoded: Tensor,
}

fn run_all(m: &SdModel) -> Outputs {
    let mut rng = Rng::new(7);
    let text = m.encode_text(&["the cat", "art", ""]).unwrap();
    let x = randn(&mut rng, &[2, 4, 8, 8]);
    let unet = m.predict(&x, 500, &text.narrow(0, 0, 2).unwrap()).unwrap();
    let pixels = uniform(&mut rng, &[2, 3, 32, 32]);
    let mean = m.encode_images(&pixels).unwrap();
    let decoded = m.decode_latents(&mean).unwrap();
    Outputs { text, unet, mean, decoded }
}

#[test]
fn pipeline_runs_with_the_shapes_diffusers_gives() {
    let d = tempfile::tempdir().unwrap();
    let (_, _, p) = micro(d.path(), 1);
    let base = BaseModel::open(&p).unwrap();
    assert!(is_sd_base(&base));
    let m = SdModel::load(&base, None, &Device::Cpu).unwrap();
    let info = m.info();
    assert_eq!(
        (info.family, info.layout, info.resolution, info.latent_channels),
        (SdFamily::Sd1, SdLayout::DiffusersDir, 32, 4)
    );
    assert_eq!(info.text_max_length, 16);
    assert_eq!(info.schedule, "scaled_linear 0.00085..0.012, 1000 steps");
    assert_eq!(m.schedule().train_timesteps, 1000);
    let o = run_all(&m);
    assert_eq!(o.text.dims(), &[3, 16, 32]);
    assert_eq!(o.unet.dims(), &[2, 4, 8, 8]);
    assert_eq!(o.mean.dims(), &[2, 4, 8, 8]);
    assert_eq!(o.decoded.dims(), &[2, 3, 32, 32]);
    // Token ids: BOS, the BPE of each word (merges t·h, th·e</w>, …), EOS, EOS padding.
    let ids = m.tokenize(&["The  cat!", ""]).unwrap();
    let spec = SdPipelineSpec::micro();
    let id = |t: &str| spec.vocab[t];
    let (bos, eos) = (id("<|startoftext|>"), id("<|endoftext|>"));
    let mut want = vec![bos, id("the</w>"), id("cat</w>"), id("!</w>"), eos];
    want.resize(16, eos);
    assert_eq!(ids[0], want);
    assert_eq!(ids[1], [vec![bos], vec![eos; 15]].concat());
    // Truncation keeps BOS, 14 tokens and EOS.
    let long = m.tokenize(&["a b c d e f g h i j k l m n o p q r"]).unwrap();
    assert_eq!((long[0].len(), long[0][0], long[0][15], long[0][14]), (16, bos, eos, id("n</w>")));
    // One timestep for all equals the same timestep per sample; a batch of one context is
    // broadcast.
    let mut rng = Rng::new(3);
    let x = randn(&mut rng, &[2, 4, 8, 8]);
    let ctx = m.encode_text(&["the cat"]).unwrap();
    let a = m.predict(&x, 250, &ctx).unwrap();
    let b = m.predict_each(&x, &[250, 250], &Tensor::cat(&[&ctx, &ctx], 0).unwrap()).unwrap();
    assert_close("scalar vs per-sample timesteps", &a, &b, 1e-6);
    let c = m.predict_each(&x, &[250, 900], &ctx).unwrap();
    assert_same("first sample at its own timestep", &c.narrow(0, 0, 1).unwrap(), &a.narrow(0, 0, 1).unwrap());
    // DDIM is deterministic and gives latents of the noise's shape.
    let un = m.encode_text(&[""]).unwrap();
    let z1 = m.sample_ddim(&x, &ctx, &un, 3, 7.5).unwrap();
    let z2 = m.sample_ddim(&x, &ctx, &un, 3, 7.5).unwrap();
    assert_same("DDIM twice", &z1, &z2);
    assert_eq!(z1.dims(), &[2, 4, 8, 8]);
    // Bad calls are usage errors, not panics.
    assert!(matches!(m.predict(&x, 1000, &ctx), Err(Error::Usage(_))));
    assert!(matches!(m.encode_images(&uniform(&mut rng, &[1, 3, 30, 30])), Err(Error::Usage(_))));
    assert!(matches!(m.predict(&x, 1, &uniform(&mut rng, &[1, 16, 31])), Err(Error::Usage(_))));
    assert!(matches!(m.sample_ddim(&x, &ctx, &un, 0, 7.5), Err(Error::Usage(_))));
}

#[test]
fn a_single_file_checkpoint_runs_bit_identically_to_its_pipeline() {
    let d = tempfile::tempdir().unwrap();
    let (_, w, p) = micro(d.path(), 2);
    let ckpt = d.path().join("micro-ldm.safetensors");
    to_ldm(&w).write(&ckpt).unwrap();
    let base = BaseModel::open(&ckpt).unwrap();
    assert!(is_sd_base(&base));
    let single = SdModel::load(&base, Some(&p.join("tokenizer")), &Device::Cpu).unwrap();
    let pipe = load(&p, None);
    let (a, b) = (run_all(&single), run_all(&pipe));
    assert_same("text encoder", &a.text, &b.text);
    assert_same("UNet", &a.unet, &b.unet);
    assert_same("VAE mean", &a.mean, &b.mean);
    assert_same("VAE decoded", &a.decoded, &b.decoded);
    let (si, pi) = (single.info(), pipe.info());
    assert_eq!(si.layout, SdLayout::SingleFile);
    assert!(
        si.config_source.starts_with("inferred from tensor shapes; what shapes do not show"),
        "{}",
        si.config_source
    );
    assert_eq!(
        (si.params, si.resolution, si.prediction, si.schedule),
        (pi.params, pi.resolution, pi.prediction, pi.schedule)
    );
    // The checkpoint's tokenizer folder and the pipeline configs beside it are inputs too.
    let names: Vec<String> = single.input_files().iter().map(|(p, _)| p.display().to_string()).collect();
    assert!(
        names.iter().any(|n| n.ends_with("vocab.json")) && names.iter().any(|n| n.ends_with("unet/config.json")),
        "{names:?}"
    );

    // Without the pipeline's configs, what the shapes cannot say (here: 8 norm groups) is
    // asked for by name.
    let lone = d.path().join("tok");
    std::fs::create_dir(&lone).unwrap();
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(p.join("tokenizer").join(f), lone.join(f)).unwrap();
    }
    let reason = input_error(SdModel::load(&base, Some(&lone), &Device::Cpu), &ckpt);
    assert!(reason.contains("32 norm groups") && reason.contains("--tokenizer"), "{reason}");
}

#[test]
fn single_file_shapes_give_sd_conventions_without_companion_configs() {
    // A wider micro model (channels multiples of 32, CLIP width 64) infers everything:
    // 32 groups, 8 heads (SD 1.x), CLIP heads of 64, SD 1.5's schedule, 512 pixels.
    let d = tempfile::tempdir().unwrap();
    let mut spec = SdPipelineSpec::micro();
    spec.unet["norm_num_groups"] = 32.into();
    spec.unet["cross_attention_dim"] = 64.into();
    spec.vae["block_out_channels"] = serde_json::json!([32, 64, 64]);
    spec.vae["norm_num_groups"] = 32.into();
    spec.text_encoder["hidden_size"] = 64.into();
    spec.text_encoder["num_attention_heads"] = 1.into();
    let w = spec.random_weights(5).unwrap();
    let p = d.path().join("pipeline");
    spec.write(&p, &w).unwrap();
    let ckpt = d.path().join("wide.safetensors");
    to_ldm(&w).write(&ckpt).unwrap();
    let lone = d.path().join("tok");
    std::fs::create_dir(&lone).unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(p.join("tokenizer").join(f), lone.join(f)).unwrap();
    }
    let single = load(&ckpt, Some(&lone));
    let info = single.info();
    assert_eq!((info.resolution, info.text_max_length), (512, 16));
    assert_eq!(info.schedule_source, "SD 1.5 defaults");
    assert!(info.config_source.ends_with("schedule: SD 1.5 defaults"), "{}", info.config_source);
    // The pipeline says 8 heads (SD 1.x's convention) too, so the UNets agree exactly.
    let pipe = load(&p, None);
    let mut rng = Rng::new(9);
    let x = randn(&mut rng, &[1, 4, 8, 8]);
    let ctx = pipe.encode_text(&["art"]).unwrap();
    assert_same("UNet", &single.predict(&x, 100, &ctx).unwrap(), &pipe.predict(&x, 100, &ctx).unwrap());
    assert_same("text encoder (one head of 64)", &single.encode_text(&["art"]).unwrap(), &ctx);
}

#[test]
fn bad_bases_are_input_errors_naming_them() {
    let d = tempfile::tempdir().unwrap();
    let (_, w, p) = micro(d.path(), 3);
    let ckpt = d.path().join("micro-ldm.safetensors");
    to_ldm(&w).write(&ckpt).unwrap();
    // A single file without --tokenizer.
    let reason = input_error(SdModel::load(&BaseModel::open(&ckpt).unwrap(), None, &Device::Cpu), &ckpt);
    assert!(reason.contains("--tokenizer DIR") && reason.contains("vocab.json and merges.txt"), "{reason}");
    // SDXL: a second text encoder in a pipeline, conditioner.embedders.1 in a single file.
    std::fs::create_dir(p.join("text_encoder_2")).unwrap();
    std::fs::copy(p.join("text_encoder/config.json"), p.join("text_encoder_2/config.json")).unwrap();
    let sdxl = BaseModel::open(&p).unwrap();
    assert!(!is_sd_base(&sdxl));
    let reason = input_error(SdModel::load(&sdxl, None, &Device::Cpu), &p);
    for want in ["SDXL", "two text encoders", "pooled text embedding", "size/crop time ids"] {
        assert!(reason.contains(want), "{reason}");
    }
    let mut b = to_ldm(&w);
    b.add("conditioner.embedders.1.model.ln_final.weight", &[4], &[1.0; 4], Dtype::F32);
    let xl = d.path().join("sdxl.safetensors");
    b.write(&xl).unwrap();
    let reason =
        input_error(SdModel::load(&BaseModel::open(&xl).unwrap(), Some(&p.join("tokenizer")), &Device::Cpu), &xl);
    assert!(reason.contains("SDXL"), "{reason}");
    // A checkpoint without its VAE (the cut-down SD base of the text fixtures) and a text model.
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sd-tiny-base.safetensors");
    let tb = BaseModel::open(&tiny).unwrap();
    assert!(!is_sd_base(&tb));
    let reason = input_error(SdModel::load(&tb, Some(&p.join("tokenizer")), &Device::Cpu), &tiny);
    assert!(reason.contains("lacks the VAE (first_stage_model.*)"), "{reason}");
    let llama = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama-tiny");
    let reason = input_error(SdModel::load(&BaseModel::open(&llama).unwrap(), None, &Device::Cpu), &llama);
    assert!(reason.contains("a text model, not a Stable Diffusion base"), "{reason}");
    // A tensor of the wrong shape or a NaN in the weights.
    let mut bad = w.clone();
    bad.get_mut("unet.conv_in.weight").unwrap().1[5] = f32::NAN;
    let q = d.path().join("nan");
    SdPipelineSpec::micro().write(&q, &bad).unwrap();
    let reason = input_error(SdModel::load(&BaseModel::open(&q).unwrap(), None, &Device::Cpu), &q);
    assert_eq!(reason, "weight unet.conv_in.weight holds a non-finite value at index 5");
}

// ------------------------------------------------------------------------------------------
// Merging
// ------------------------------------------------------------------------------------------

/// A kohya LoRA/LoCon module: `name` with up `[out, r(,1,1)]`, down `[r, in(, k, k)]`, alpha.
fn kohya(b: &mut SafetensorsBuilder, rng: &mut Rng, name: &str, up: &[usize], down: &[usize], alpha: f32, zero: bool) {
    let nu: usize = up.iter().product();
    let upv: Vec<f32> = (0..nu).map(|_| if zero { 0.0 } else { 0.3 * rng.uniform() as f32 }).collect();
    let nd: usize = down.iter().product();
    let dv: Vec<f32> = (0..nd).map(|_| 0.3 * rng.uniform() as f32).collect();
    b.add(&format!("{name}.lora_up.weight"), up, &upv, Dtype::F32);
    b.add(&format!("{name}.lora_down.weight"), down, &dv, Dtype::F32);
    b.add(&format!("{name}.alpha"), &[], &[alpha], Dtype::F32);
}

/// The modules of the merge tests: a linear in a UNet attention, a 3×3 conv in a resnet
/// (LoCon), a 1×1 conv projection, and a text-encoder projection.
const MODULES: &[(&str, &str, &[usize], &[usize])] = &[
    (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        &[32, 4],
        &[4, 32],
    ),
    (
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "unet.down_blocks.0.resnets.0.conv1.weight",
        &[32, 2, 1, 1],
        &[2, 32, 3, 3],
    ),
    (
        "lora_unet_mid_block_attentions_0_proj_in",
        "unet.mid_block.attentions.0.proj_in.weight",
        &[64, 3, 1, 1],
        &[3, 64, 1, 1],
    ),
    (
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj",
        "text_encoder.text_model.encoder.layers.1.self_attn.v_proj.weight",
        &[32, 4],
        &[4, 32],
    ),
];

fn write_kohya(path: &Path, zero: bool) {
    let mut rng = Rng::new(11);
    let mut b = SafetensorsBuilder::new();
    for (name, _, up, down) in MODULES {
        kohya(&mut b, &mut rng, name, up, down, 2.0, zero);
    }
    b.write(path).unwrap();
}

/// W + (alpha/r)·up·down with plain loops over the tensors as stored in the file.
fn dense_merge(w: &Weights, adapter: &Path) -> Weights {
    let bytes = std::fs::read(adapter).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let read = |k: &str| -> (Vec<usize>, Vec<f64>) {
        let t = st.tensor(k).unwrap();
        let v = t.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect();
        (t.shape().to_vec(), v)
    };
    let mut out = w.clone();
    for (name, key, _, _) in MODULES {
        let (us, u) = read(&format!("{name}.lora_up.weight"));
        let (ds, dn) = read(&format!("{name}.lora_down.weight"));
        let alpha = read(&format!("{name}.alpha")).1[0];
        let (o, r) = (us[0], us[1]);
        let cols: usize = ds[1..].iter().product();
        let scale = alpha / r as f64;
        let (_, wv) = out.get_mut(*key).unwrap();
        for i in 0..o {
            for j in 0..cols {
                let mut s = 0.0;
                for k in 0..r {
                    s += u[i * r + k] * dn[k * cols + j];
                }
                wv[i * cols + j] = (wv[i * cols + j] as f64 + scale * s) as f32;
            }
        }
    }
    out
}

fn attach(adapter: &Path, base: &Path) -> lorascope::Adapter {
    lorascope::pipeline::open(adapter, Some(base), &LoadOptions::default()).unwrap().0
}

#[test]
fn merged_linear_and_conv_modules_match_a_dense_reference() {
    let d = tempfile::tempdir().unwrap();
    let (spec, w, p) = micro(d.path(), 4);
    let lora = d.path().join("lora.safetensors");
    write_kohya(&lora, false);
    let base = load(&p, None);
    let (merged, summary) = base.merged(&attach(&lora, &p)).unwrap();
    assert_eq!(summary.merged.len(), MODULES.len());
    assert!(summary.zero.is_empty());
    // The same ΔW written into the weights by plain loops.
    let dense_dir = d.path().join("dense");
    spec.write(&dense_dir, &dense_merge(&w, &lora)).unwrap();
    let dense = load(&dense_dir, None);
    let (a, b, o) = (run_all(&merged), run_all(&dense), run_all(&base));
    assert_close("merged vs dense text encoder", &a.text, &b.text, 1e-6);
    assert_close("merged vs dense UNet", &a.unet, &b.unet, 1e-6);
    assert!(diff(&a.unet, &o.unet).0 > 1e-4, "the adapter changes the UNet");
    // The VAE is shared: unchanged.
    assert_same("VAE", &a.decoded, &o.decoded);
    // The same adapter on the single-file checkpoint (kohya names resolved to LDM keys) merges
    // to the same model.
    let ckpt = d.path().join("micro-ldm.safetensors");
    to_ldm(&w).write(&ckpt).unwrap();
    let single = load(&ckpt, Some(&p.join("tokenizer")));
    let (sm, ss) = single.merged(&attach(&lora, &ckpt)).unwrap();
    assert_eq!(ss.merged.len(), MODULES.len());
    assert!(ss.merged.iter().any(|k| k.starts_with("model.diffusion_model.input_blocks.1.0.in_layers.2")), "{ss:?}");
    let s = run_all(&sm);
    assert_same("single-file merged UNet", &s.unet, &a.unet);
    assert_same("single-file merged text encoder", &s.text, &a.text);
}

/// transformers ≥ 5 saves `CLIPTextModel` without its `text_model.` level (a pipeline saved by
/// transformers 5.25 has `text_encoder.encoder.layers.0…`): the same weights under those names
/// run bit-identically, and kohya's `lora_te_text_model_…` modules resolve to them.
#[test]
fn a_text_encoder_saved_without_its_text_model_level_runs_and_merges_the_same() {
    let d = tempfile::tempdir().unwrap();
    let (spec, w, p) = micro(d.path(), 4);
    let v5: Weights =
        w.iter().map(|(k, v)| (k.replacen("text_encoder.text_model.", "text_encoder.", 1), v.clone())).collect();
    let q = d.path().join("v5");
    spec.write(&q, &v5).unwrap();
    let te_key = "text_encoder.encoder.layers.1.self_attn.v_proj.weight";
    let opened = BaseModel::open(&q).unwrap();
    assert!(opened.keys().any(|k| k == te_key) && !opened.keys().any(|k| k.contains("text_model.")));
    let (old, new) = (load(&p, None), load(&q, None));
    let (a, b) = (run_all(&old), run_all(&new));
    assert_same("text encoder", &b.text, &a.text);
    assert_same("UNet", &b.unet, &a.unet);
    assert_eq!(new.info().params, old.info().params);
    let lora = d.path().join("lora.safetensors");
    write_kohya(&lora, false);
    let (mo, _) = old.merged(&attach(&lora, &p)).unwrap();
    let (mn, sn) = new.merged(&attach(&lora, &q)).unwrap();
    assert_eq!(sn.merged.len(), MODULES.len(), "{sn:?}");
    assert!(sn.merged.iter().any(|k| k == te_key), "{sn:?}");
    let (ma, mb) = (run_all(&mo), run_all(&mn));
    assert!(diff(&ma.text, &a.text).0 > 1e-4, "the adapter changes the text encoder");
    assert_same("merged text encoder", &mb.text, &ma.text);
    assert_same("merged UNet", &mb.unet, &ma.unet);
}

#[test]
fn a_zero_adapter_leaves_every_output_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let (_, _, p) = micro(d.path(), 5);
    let zero = d.path().join("zero.safetensors");
    write_kohya(&zero, true);
    let base = load(&p, None);
    let (merged, summary) = base.merged(&attach(&zero, &p)).unwrap();
    assert!(summary.merged.is_empty());
    assert_eq!(summary.zero.len(), MODULES.len());
    let (a, b) = (run_all(&merged), run_all(&base));
    assert_same("UNet", &a.unet, &b.unet);
    assert_same("text encoder", &a.text, &b.text);
}

#[test]
fn adapters_that_change_nothing_the_runtime_merges_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let (_, _, p) = micro(d.path(), 6);
    let base = load(&p, None);
    // A module on the VAE (resolved: the pipeline maps vae/), which the probe keeps as the base's.
    let vae_lora = d.path().join("vae-lora.safetensors");
    let mut rng = Rng::new(1);
    let mut b = SafetensorsBuilder::new();
    kohya(&mut b, &mut rng, "lora_vae_decoder_conv_in", &[32, 2, 1, 1], &[2, 4, 3, 3], 2.0, false);
    b.write(&vae_lora).unwrap();
    let reason = input_error(base.merged(&attach(&vae_lora, &p)), &vae_lora);
    assert!(reason.contains("changes the VAE"), "{reason}");
    // An SD adapter against a text model, and a text adapter against the SD base, never attach.
    let sd_lora = d.path().join("lora.safetensors");
    write_kohya(&sd_lora, false);
    let llama = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama-tiny");
    let e = lorascope::pipeline::open(&sd_lora, Some(&llama), &LoadOptions::default()).err().expect("refused");
    assert_eq!(e.exit_code(), 2, "{e}");
    let peft = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft-llama");
    let e = lorascope::pipeline::open(&peft, Some(&p), &LoadOptions::default()).err().expect("refused");
    assert_eq!(e.exit_code(), 2, "{e}");
    // Skipping what does not match leaves nothing to merge: refused, naming the adapter.
    let opts = LoadOptions { allow_unmatched: true, ..Default::default() };
    let (a, _) = lorascope::pipeline::open(&peft, Some(&p), &opts).unwrap();
    let reason = input_error(base.merged(&a), &a.path);
    assert!(reason.contains("no module of the adapter changes a UNet or text-encoder weight"), "{reason}");
}

// ------------------------------------------------------------------------------------------
// fixtures/sd-micro: against diffusers' stored values
// ------------------------------------------------------------------------------------------

fn sd_micro() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sd-micro");
    if d.join("reference.json").is_file() {
        Some(d)
    } else {
        println!("note: fixtures/sd-micro is absent; the comparison with diffusers' values was skipped");
        None
    }
}

struct Reference {
    json: serde_json::Value,
    tensors: BTreeMap<String, Tensor>,
}

impl Reference {
    fn read(dir: &Path) -> Reference {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = BTreeMap::new();
        for (k, t) in st.tensors() {
            assert_eq!(t.dtype(), Dtype::F32, "{k}");
            let v: Vec<f32> = t.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            tensors.insert(k.to_string(), Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap());
        }
        Reference { json, tensors }
    }
    fn t(&self, k: &str) -> &Tensor {
        self.tensors.get(k).unwrap_or_else(|| panic!("reference has no {k}"))
    }
}

const TOL: f64 = 1e-4;

#[test]
fn fixture_tokenizer_ids_equal_clip_tokenizer() {
    let Some(dir) = sd_micro() else { return };
    let r = Reference::read(&dir);
    let m = load(&dir.join("pipeline"), None);
    let caps: Vec<&str> = r.json["te"]["captions"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let want: Vec<Vec<u32>> = serde_json::from_value(r.json["te"]["input_ids"].clone()).unwrap();
    assert_eq!(m.tokenize(&caps).unwrap(), want);
    for im in r.json["images"].as_array().unwrap() {
        let want: Vec<u32> = serde_json::from_value(im["input_ids"].clone()).unwrap();
        assert_eq!(m.tokenize(&[im["caption"].as_str().unwrap()]).unwrap()[0], want, "{}", im["caption"]);
    }
    let ids: Vec<u32> = vals(r.t("te.input_ids")).iter().map(|&x| x as u32).collect();
    assert_eq!(ids, want_flat(&r));
}

fn want_flat(r: &Reference) -> Vec<u32> {
    let want: Vec<Vec<u32>> = serde_json::from_value(r.json["te"]["input_ids"].clone()).unwrap();
    want.concat()
}

#[test]
fn fixture_text_encoder_unet_and_vae_match_diffusers() {
    let Some(dir) = sd_micro() else { return };
    let r = Reference::read(&dir);
    let m = load(&dir.join("pipeline"), None);
    let caps: Vec<&str> = r.json["te"]["captions"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_close("te.hidden", &m.encode_text(&caps).unwrap(), r.t("te.hidden"), TOL);
    for t in [10, 500] {
        let out = m.predict(r.t("unet.sample"), t, r.t("unet.context")).unwrap();
        assert_close(&format!("unet.out.t{t}"), &out, r.t(&format!("unet.out.t{t}")), TOL);
    }
    let sf = m.info().scaling_factor;
    let mean = (m.encode_images(r.t("vae.pixels")).unwrap() / sf).unwrap();
    assert_close("vae.mean", &mean, r.t("vae.mean"), TOL);
    let decoded = m.decode_latents(&(r.t("vae.mean") * sf).unwrap()).unwrap();
    assert_close("vae.decoded", &decoded, r.t("vae.decoded"), TOL);
    let ac =
        Tensor::from_vec(m.schedule().alphas_cumprod.iter().map(|&a| a as f32).collect::<Vec<_>>(), 1000, &Device::Cpu)
            .unwrap();
    assert_close("sched.alphas_cumprod", &ac, r.t("sched.alphas_cumprod"), 1e-6);
}

/// Per-image denoising MSE at the reference's K timesteps × N noise draws, from its z0.
fn losses(m: &SdModel, r: &Reference, captions: &[String]) -> Tensor {
    let ts: Vec<usize> = vals(r.t("loss.timesteps")).iter().map(|&t| t as usize).collect();
    let noise = r.t("loss.noise");
    let (k, n) = (noise.dim(0).unwrap(), noise.dim(1).unwrap());
    let eps = noise.reshape((k * n, 4, 8, 8)).unwrap();
    let z0 = r.t("loss.z0");
    let mut out = vec![];
    for (i, cap) in captions.iter().enumerate() {
        let ctx = m.encode_text(&[cap.as_str()]).unwrap();
        let z = z0.narrow(0, i, 1).unwrap();
        let mut xs = vec![];
        let mut each = vec![];
        for (ki, &t) in ts.iter().enumerate() {
            for ni in 0..n {
                let e = eps.narrow(0, ki * n + ni, 1).unwrap();
                xs.push(m.schedule().add_noise(&z, &e, t).unwrap());
                each.push(t);
            }
        }
        let x = Tensor::cat(&xs, 0).unwrap();
        let pred = m.predict_each(&x, &each, &ctx).unwrap();
        let mse = (pred - &eps).unwrap().sqr().unwrap().mean((1, 2, 3)).unwrap();
        out.push(mse);
    }
    Tensor::stack(&out, 0).unwrap().reshape((captions.len(), k, n)).unwrap()
}

#[test]
fn fixture_denoising_losses_match_diffusers() {
    let Some(dir) = sd_micro() else { return };
    let r = Reference::read(&dir);
    let m = load(&dir.join("pipeline"), None);
    // z0 of the two works the VAE reference encodes.
    let sf = m.info().scaling_factor;
    let z = m.encode_images(r.t("vae.pixels")).unwrap();
    assert_close("loss.z0 (first two images)", &z, &r.t("loss.z0").narrow(0, 0, 2).unwrap(), TOL);
    assert!((sf - 0.18215).abs() < 1e-12);
    let caps: Vec<String> =
        r.json["images"].as_array().unwrap().iter().map(|im| im["caption"].as_str().unwrap().to_string()).collect();
    assert_close("loss.base.cond.full", &losses(&m, &r, &caps), r.t("loss.base.cond.full"), TOL);
    let empty = vec![String::new(); caps.len()];
    assert_close("loss.base.uncond.full", &losses(&m, &r, &empty), r.t("loss.base.uncond.full"), TOL);
}

#[test]
fn fixture_lora_merges_match_diffusers_loaded_lora() {
    let Some(dir) = sd_micro() else { return };
    let r = Reference::read(&dir);
    let p = dir.join("pipeline");
    let base = load(&p, None);
    let (x, ctx) = (r.t("unet.sample"), r.t("unet.context"));
    let caps: Vec<&str> = r.json["te"]["captions"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let mut outs = vec![];
    for (file, key) in [("lora-diffusers.safetensors", "lora_diffusers"), ("lora-kohya.safetensors", "lora_kohya")] {
        let f = dir.join(file);
        if !f.is_file() {
            println!("note: fixtures/sd-micro/{file} is absent; skipped");
            continue;
        }
        let (m, summary) = base.merged(&attach(&f, &p)).unwrap();
        assert!(!summary.merged.is_empty() && summary.zero.is_empty(), "{summary:?}");
        let out = m.predict(x, 10, ctx).unwrap();
        assert!(diff(&out, r.t("unet.out.t10")).0 > 1e-3, "{file} changes the UNet");
        for t in [10, 500] {
            let name = format!("unet.out.{key}.t{t}");
            match r.tensors.get(&name) {
                Some(want) => {
                    assert_close(&name, &m.predict(x, t, ctx).unwrap(), want, TOL);
                }
                None => println!("note: reference {name} is absent; skipped"),
            }
        }
        let hidden = m.encode_text(&caps).unwrap();
        match r.tensors.get("te.hidden.lora") {
            Some(want) => {
                assert_close(&format!("te.hidden.lora ({key})"), &hidden, want, TOL);
            }
            None => println!("note: reference te.hidden.lora is absent; skipped"),
        }
        // Per-image denoising losses of the merged model (the fixture's LoRA losses were computed
        // with lora-diffusers; the kohya file merges to the same model).
        for mode in ["cond", "uncond"] {
            let name = format!("loss.lora.{mode}.full");
            let Some(want) = r.tensors.get(&name) else {
                println!("note: reference {name} is absent; skipped");
                continue;
            };
            let caps: Vec<String> = r.json["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|im| if mode == "cond" { im["caption"].as_str().unwrap().to_string() } else { String::new() })
                .collect();
            assert_close(&format!("{name} ({key})"), &losses(&m, &r, &caps), want, TOL);
        }
        outs.push((key, out, hidden));
    }
    // Both namings of one LoRA merge to the same model.
    if let [(_, a, ha), (_, b, hb)] = &outs[..] {
        assert_close("kohya vs diffusers naming, UNet", b, a, 1e-6);
        assert_close("kohya vs diffusers naming, text encoder", hb, ha, 1e-6);
    }
    let zero = dir.join("lora-zero.safetensors");
    if zero.is_file() {
        let (m, summary) = base.merged(&attach(&zero, &p)).unwrap();
        assert!(summary.merged.is_empty());
        assert_same("lora-zero UNet", &m.predict(x, 10, ctx).unwrap(), &base.predict(x, 10, ctx).unwrap());
    }
}

#[test]
fn fixture_single_file_checkpoint_matches_the_pipeline_bit_for_bit() {
    let Some(dir) = sd_micro() else { return };
    let ckpt = dir.join("micro-sd-ldm.safetensors");
    if !ckpt.is_file() {
        println!("note: fixtures/sd-micro/micro-sd-ldm.safetensors is absent; skipped");
        return;
    }
    let p = dir.join("pipeline");
    let (single, pipe) = (load(&ckpt, Some(&p.join("tokenizer"))), load(&p, None));
    let (a, b) = (run_all(&single), run_all(&pipe));
    assert_same("text encoder", &a.text, &b.text);
    assert_same("UNet", &a.unet, &b.unet);
    assert_same("VAE mean", &a.mean, &b.mean);
    assert_same("VAE decoded", &a.decoded, &b.decoded);
    let lora = dir.join("lora-kohya.safetensors");
    if lora.is_file() {
        let (sm, _) = single.merged(&attach(&lora, &ckpt)).unwrap();
        let (pm, _) = pipe.merged(&attach(&lora, &p)).unwrap();
        assert_same("merged UNet", &run_all(&sm).unet, &run_all(&pm).unet);
    }
}

/// The micro text encoder in open_clip's names, as SD 2.x single files keep it: q/k/v fused in
/// `in_proj`, one more block than used (SD 2.x takes the penultimate layer), the projection.
fn to_openclip(w: &Weights, b: &mut SafetensorsBuilder, rng: &mut Rng) {
    let oc = "cond_stage_model.model.";
    let te = "text_encoder.text_model.";
    let get = |k: &str| w[&format!("{te}{k}")].clone();
    b.add(
        &format!("{oc}token_embedding.weight"),
        &get("embeddings.token_embedding.weight").0,
        &get("embeddings.token_embedding.weight").1,
        Dtype::F32,
    );
    let (ps, pv) = get("embeddings.position_embedding.weight");
    b.add(&format!("{oc}positional_embedding"), &ps, &pv, Dtype::F32);
    for i in 0..2 {
        let l = format!("encoder.layers.{i}.");
        let r = format!("{oc}transformer.resblocks.{i}.");
        for s in ["weight", "bias"] {
            let parts: Vec<(Vec<usize>, Vec<f32>)> =
                ["q", "k", "v"].iter().map(|p| get(&format!("{l}self_attn.{p}_proj.{s}"))).collect();
            let mut shape = parts[0].0.clone();
            shape[0] *= 3;
            let v: Vec<f32> = parts.iter().flat_map(|p| p.1.clone()).collect();
            b.add(&format!("{r}attn.in_proj_{s}"), &shape, &v, Dtype::F32);
            for (hf, oc_name) in [
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ] {
                let (sh, v) = get(&format!("{l}{hf}.{s}"));
                b.add(&format!("{r}{oc_name}.{s}"), &sh, &v, Dtype::F32);
            }
        }
    }
    // The last block, which SD 2.x does not use, and the projection to the image space.
    for (k, (sh, _)) in w.iter().filter(|(k, _)| k.starts_with(&format!("{te}encoder.layers.0."))) {
        let rest = &k[format!("{te}encoder.layers.0.").len()..];
        let name = rest
            .replace("self_attn.out_proj", "attn.out_proj")
            .replace("layer_norm1", "ln_1")
            .replace("layer_norm2", "ln_2")
            .replace("mlp.fc1", "mlp.c_fc")
            .replace("mlp.fc2", "mlp.c_proj");
        if !rest.contains("_proj.") || rest.contains("out_proj") {
            b.random(rng, &format!("{oc}transformer.resblocks.2.{name}"), sh, 0.1, Dtype::F32);
        }
    }
    b.random(rng, &format!("{oc}transformer.resblocks.2.attn.in_proj_weight"), &[96, 32], 0.1, Dtype::F32);
    b.random(rng, &format!("{oc}transformer.resblocks.2.attn.in_proj_bias"), &[96], 0.1, Dtype::F32);
    let (fs, fv) = get("final_layer_norm.weight");
    b.add(&format!("{oc}ln_final.weight"), &fs, &fv, Dtype::F32);
    let (fs, fv) = get("final_layer_norm.bias");
    b.add(&format!("{oc}ln_final.bias"), &fs, &fv, Dtype::F32);
    b.random(rng, &format!("{oc}text_projection"), &[32, 32], 0.1, Dtype::F32);
}

#[test]
fn an_sd2_single_file_reads_openclip_text_weights() {
    let d = tempfile::tempdir().unwrap();
    let (_, w, p) = micro(d.path(), 8);
    let ldm = to_ldm(&w);
    // The same checkpoint with its text encoder in open_clip's layout instead.
    let mut b = SafetensorsBuilder::new();
    let bytes = ldm.to_bytes();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (k, t) in st.tensors().into_iter().filter(|(k, _)| !k.starts_with("cond_stage_model.")) {
        let v: Vec<f32> = t.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        b.add(&k, t.shape(), &v, Dtype::F32);
    }
    to_openclip(&w, &mut b, &mut Rng::new(2));
    let ckpt = d.path().join("sd2-like.safetensors");
    b.write(&ckpt).unwrap();
    let single = load(&ckpt, Some(&p.join("tokenizer")));
    assert_eq!(single.info().family, SdFamily::Sd2);
    let pipe = load(&p, None);
    let caps = ["the cat", "art", ""];
    assert_same(
        "text encoder from open_clip names",
        &single.encode_text(&caps).unwrap(),
        &pipe.encode_text(&caps).unwrap(),
    );
}

#[test]
fn models_can_be_shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<SdModel>();
}
