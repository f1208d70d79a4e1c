"""The protocol the Python references of benches/probe.rs answer (pytorch_reference.py,
llamacpp_reference.py): a ready line, then one line in per request ("score", "gen NAME" or
"quit") and one JSON line out, with the request's wall time in "seconds", so the bench can
interleave the two sides.
"""
import json
import sys
import time


def serve(hello, score, gen):
    """Answer requests on stdin: `score()` and `gen(name)` return the rest of each answer."""
    print(json.dumps({"ready": True, **hello}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        t = time.perf_counter()
        out = score() if cmd[0] == "score" else gen(cmd[1])
        print(json.dumps({"seconds": time.perf_counter() - t, **out}), flush=True)
