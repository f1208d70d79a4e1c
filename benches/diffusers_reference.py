"""The diffusers side of `cargo bench --bench image_probe` (benches/image_probe.rs).

Two uses:

  diffusers_reference.py make-sd15 DIR
      Writes a diffusers pipeline directory with SD 1.5's published shapes (UNet, VAE and CLIP
      ViT-L/14 text encoder configs of runwayml/stable-diffusion-v1-5) and random weights
      (torch.manual_seed(0), the modules' default initialisation), float32 safetensors, the
      tokenizer and scheduler of fixtures/sd-micro/pipeline. About 4.3 GB. Random weights time
      the same arithmetic as the real ones; nothing about the outputs is meaningful.

  diffusers_reference.py serve JOB.json
      Loads the pipeline's UNet and VAE with diffusers (float32, its default attention
      processor, `torch.set_num_threads(threads)`), reads the inputs the bench wrote
      (safetensors: x, t, context, pixels), and answers timing requests on stdin, one line in,
      one JSON line out: "unet" / "vae" (seconds of one UNet forward / one VAE encode to the
      latent mean × scaling factor), "unet check" / "vae check" (the same, with the output
      values), "rss" (this process's peak RSS), "quit".
"""
import json
import os
import resource
import shutil
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "fixtures", "sd-micro", "pipeline")

SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
SD15_VAE = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
SD15_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    vocab_size=49408,
    projection_dim=768,
)


def make_sd15(out):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    os.makedirs(out, exist_ok=True)
    UNet2DConditionModel(**SD15_UNET).save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    AutoencoderKL(**SD15_VAE).save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).save_pretrained(
        os.path.join(out, "text_encoder"), safe_serialization=True
    )
    for part in ["tokenizer", "scheduler"]:
        shutil.copytree(os.path.join(FIXTURE, part), os.path.join(out, part), dirs_exist_ok=True)
    shutil.copy(os.path.join(FIXTURE, "model_index.json"), os.path.join(out, "model_index.json"))


def serve(job_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    job = json.load(open(job_path))
    torch.set_num_threads(job["threads"])
    pipe = job["pipeline"]
    unet = UNet2DConditionModel.from_pretrained(os.path.join(pipe, "unet"), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(pipe, "vae"), torch_dtype=torch.float32).eval()
    inp = load_file(job["inputs"])
    x, ctx, px = inp["x"], inp["context"], inp["pixels"]
    t = int(inp["t"].item())

    def run_unet():
        with torch.inference_mode():
            return unet(x, t, encoder_hidden_states=ctx).sample

    def run_vae():
        with torch.inference_mode():
            return vae.encode(px).latent_dist.mean * vae.config.scaling_factor

    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "rss":
            print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), flush=True)
            continue
        f = run_unet if cmd[0] == "unet" else run_vae
        start = time.perf_counter()
        y = f()
        out = {"seconds": time.perf_counter() - start}
        if len(cmd) > 1 and cmd[1] == "check":
            out["values"] = [float(v) for v in y.flatten()]
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make-sd15":
        make_sd15(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(__doc__)
