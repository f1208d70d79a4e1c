"""The probe's model work in PyTorch + transformers, for benches/probe.rs.

Reads a JSON job (GGUF path, token sequences to score, prompts to continue), runs it with the
same model dequantised to float32, and answers timing requests on stdin. Same work as lorascope:
teacher-forced log-probabilities with the next-token distribution's mean and standard deviation
of log p (what Min-K%++ needs) for every position, and greedy generation with a KV cache.
"""
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM

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


# Serve timing requests so the bench can interleave the two sides: one line in ("score",
# "gen NAME" or "quit"), one JSON line out.
print(json.dumps({"ready": True, "torch": torch.__version__}), flush=True)
score([job["score_batches"][0][0][:8]])  # warm-up
for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == "quit":
        break
    t = time.perf_counter()
    if cmd[0] == "score":
        res = [score(b) for b in job["score_batches"]]
        out = {"seconds": time.perf_counter() - t, "first_logprobs": [float(x) for x in res[0][0][0, :8]]}
    else:
        g = generate(job["gen_batches"][cmd[1]], job["new_tokens"])
        out = {"seconds": time.perf_counter() - t, "tokens": int(g.numel()), "first_row": g[0].tolist()}
    print(json.dumps(out), flush=True)
