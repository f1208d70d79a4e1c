#!/usr/bin/env python3
"""More generic controls for fixtures/sd-micro: images of the three artists the LoRA was not
trained on (artist-b, -c, -d), painted by scripts/make-sd-fixture.py's own `paint` with a seed
of their own, so the fixture has enough controls (>= 80) for per-image calibrated verdicts on
its four works (Holm needs n >= m / 0.05). Only numpy and Pillow are needed (no training):

    target/sd-venv/bin/python scripts/make-sd-controls.py [--per-artist 28]

Writes fixtures/sd-micro/controls/{b,c,d}-1NN.png and .txt beside the eight controls the
fixture script ships (b-01 … d-02, which keep their diffusers reference values)."""
import argparse
import importlib.util
import os

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("fixture", os.path.join(REPO, "scripts", "make-sd-fixture.py"))
fixture = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fixture)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-artist", type=int, default=28)
    a = ap.parse_args()
    out = os.path.join(REPO, "fixtures", "sd-micro", "controls")
    rng = np.random.default_rng(fixture.SEED + 777)
    for artist in ["artist-b", "artist-c", "artist-d"]:
        for i in range(a.per_artist):
            img, cap = fixture.paint(rng, artist)
            name = f"{artist[-1]}-{101 + i}"
            Image.fromarray(img).save(os.path.join(out, name + ".png"), optimize=False)
            with open(os.path.join(out, name + ".txt"), "w") as f:
                f.write(cap + "\n")
    print(f"wrote {3 * a.per_artist} controls to {out}")


if __name__ == "__main__":
    main()
