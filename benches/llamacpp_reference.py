"""The probe's model work in llama.cpp (llama-cpp-python), for benches/probe.rs `--llamacpp`.

Reads the same JSON job as pytorch_reference.py (GGUF path, token sequences to score, prompts to
continue) and runs it on the GGUF's own blocks with llama.cpp's CPU kernels: teacher-forced
scoring with every position's logits (`logits_all`), then, as the probe needs, log p of each next
token and the next-token distribution's mean and standard deviation of log p (numpy, float32);
and greedy generation with its KV cache. Answers the same timing requests on stdin, and reports
the time of llama.cpp's evaluation alone beside the whole scoring time.
"""
import json
import sys
import time

import numpy as np
from llama_cpp import Llama, __version__

from reference_protocol import serve

job = json.load(open(sys.argv[1]))
longest = max(len(s) for b in job["score_batches"] for s in b)
model = Llama(
    model_path=job["gguf"],
    n_ctx=max(longest, 64 + job["new_tokens"]),
    n_batch=longest,
    n_ubatch=longest,
    n_threads=job["threads"],
    n_threads_batch=job["threads"],
    logits_all=True,
    verbose=False,
)


def logits_of(seq):
    """Every position's logits for `seq`, from an empty cache (one llama_decode of the batch)."""
    model.reset()
    model.eval(seq)
    return np.asarray(model.scores[: len(seq)], dtype=np.float32)


def stats(seq, logits):
    x = logits[:-1]
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    lsm = x - lse[:, None]
    lp = lsm[np.arange(len(seq) - 1), seq[1:]]
    p = np.exp(lsm)
    mu = (p * lsm).sum(-1)
    sd = np.sqrt(np.clip((p * lsm * lsm).sum(-1) - mu * mu, 0, None))
    return lp, mu, sd


def score_all():
    evals, first = 0.0, None
    for batch in job["score_batches"]:
        for seq in batch:
            t = time.perf_counter()
            logits = logits_of(seq)
            evals += time.perf_counter() - t
            lp, _, _ = stats(seq, logits)
            if first is None:
                first = [float(v) for v in lp[:8]]
    return {"eval_seconds": evals, "first_logprobs": first}


def generate(prompt, n):
    out = []
    for tok in model.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if len(out) == n:
            break
    return out


def gen(name):
    # Several prompts run one after another (llama-cpp-python's generate has one sequence), so
    # only one-prompt generation compares like with like.
    rows = [generate(p, job["new_tokens"]) for p in job["gen_batches"][name]]
    return {"tokens": sum(map(len, rows)), "first_row": rows[0]}


logits_of(job["score_batches"][0][0][:8])  # warm-up
serve({"llama_cpp": __version__}, score_all, gen)
