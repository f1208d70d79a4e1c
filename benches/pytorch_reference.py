"""The probe's model work in PyTorch + transformers, for benches/probe.rs.

Reads a JSON job (GGUF path, token sequences to score, prompts to continue), runs it with the
same model dequantised to float32, and answers timing requests on stdin. Same work as lorascope:
teacher-forced log-probabilities with the next-token distribution's mean and standard deviation
of log p (what Min-K%++ needs) for every position, and greedy generation with a KV cache.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

from reference_protocol import serve

job = json.load(open(sys.argv[1]))
torch.set_num_threads(job["threads"])
gguf = job["gguf"]
model = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
)
model.eval()


def score(batch):
    ids = torch.tensor(batch)
    with torch.inference_mode():
        logits = model(ids).logits[:, :-1, :]
        lsm = torch.log_softmax(logits, dim=-1)
        lp = lsm.gather(-1, ids[:, 1:, None]).squeeze(-1)
        p = lsm.exp()
        mu = (p * lsm).sum(-1)
        sd = ((p * lsm * lsm).sum(-1) - mu * mu).clamp(min=0).sqrt()
    return lp, mu, sd


def generate(prompts, n):
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, ids.shape[1]:]


def score_all():
    res = [score(b) for b in job["score_batches"]]
    return {"first_logprobs": [float(x) for x in res[0][0][0, :8]]}


def gen(name):
    g = generate(job["gen_batches"][name], job["new_tokens"])
    return {"tokens": int(g.numel()), "first_row": g[0].tolist()}


score([job["score_batches"][0][0][:8]])  # warm-up
serve({"torch": torch.__version__}, score_all, gen)
