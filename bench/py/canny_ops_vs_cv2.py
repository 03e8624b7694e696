"""Times models/ops.pt canny against cv2.Canny at 512×512 (and checks that both give the same edges).

    /usr/bin/python3 bench/py/canny_ops_vs_cv2.py [--iters 20] [--threads 2] [--device cpu|cuda] [--batch 1] [--ops models/ops.pt]
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def timed(fn, iters, sync):
    fn()
    fn()
    sync()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2] * 1e3, ts[0] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ops", default=os.path.join(ROOT, "models", "ops.pt"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import cv2
    cv2.setNumThreads(a.threads)
    ops = torch.jit.load(a.ops)
    src = Image.open(os.path.join(ROOT, "test", "fixtures", "resize", "orig_chelsea.png"))
    img = np.array(src.resize((512, 512)).convert("RGB"))
    rng = np.random.default_rng(0)
    images = {"chelsea": img, "noise": rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)}
    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    print("torch %s, cv2 %s, device %s, threads %d, batch %d, median (min) of %d"
          % (torch.__version__, cv2.__version__, a.device, a.threads, a.batch, a.iters))
    for name, im in images.items():
        t = torch.from_numpy(im)[None].repeat(a.batch, 1, 1, 1).to(dev)
        got = ops.canny(t, 100.0, 200.0)[0].cpu().numpy()
        want = cv2.Canny(im, 100, 200)
        ops_med, ops_min = timed(lambda: ops.canny(t, 100.0, 200.0), a.iters, sync)
        cv_med, cv_min = timed(lambda: [cv2.Canny(im, 100, 200) for _ in range(a.batch)], a.iters, lambda: None)
        print("%-8s ops.canny %8.2f ms (%7.2f)   cv2.Canny %7.2f ms (%6.2f)   ratio %5.1fx   differing pixels %d"
              % (name, ops_med, ops_min, cv_med, cv_min, ops_med / max(cv_med, 1e-9), int((got != want).sum())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
