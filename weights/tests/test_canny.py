"""ops.canny must reproduce OpenCV 4.6 cv2.Canny(rgb, low, high) (apertureSize 3, L1 gradient) pixel for pixel.

Oracles: OpenCV itself (python3-opencv) on the repo's photos and on synthetic images, and the reference's
512×512 canny of chelsea (test/fixtures/canny/chelsea_canny.png, computed with OpenCV 4.6 from PIL's bicubic
512 resize, reproduced here from test/fixtures/resize/orig_chelsea.png)."""
import glob
import hashlib
import os
import unittest

import numpy as np
import torch
from PIL import Image

from weights.ops import script

try:
    import cv2
except ImportError:  # pragma: no cover
    cv2 = None

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "test", "fixtures")
# sha256 of the raw RGB bytes of PIL(9.4) orig_chelsea.png.resize((512, 512)) — the reference's canny input
CHELSEA_512_SHA = "1284f23d3db01ec1f7817c7c6bd7142ba2d296d92e3821e48a8a77ed76864222"

_OPS = None


def ops():
    global _OPS
    if _OPS is None:
        _OPS = script()
    return _OPS


def canny(img, lo=100.0, hi=200.0):
    t = torch.from_numpy(np.ascontiguousarray(img))
    if t.dim() == 3:
        return ops().canny(t[None], lo, hi)[0].numpy()
    return ops().canny(t, lo, hi).numpy()


def rgb(path):
    return np.array(Image.open(path).convert("RGB"))


class TestCannyReference(unittest.TestCase):
    def test_chelsea_512_reference_png(self):
        img = np.array(Image.open(os.path.join(FIX, "resize", "orig_chelsea.png")).resize((512, 512)).convert("RGB"))
        if hashlib.sha256(img.tobytes()).hexdigest() != CHELSEA_512_SHA:
            self.skipTest("this Pillow's bicubic resize differs from the reference's input")
        want = np.array(Image.open(os.path.join(FIX, "canny", "chelsea_canny.png")))
        got = canny(img)
        self.assertEqual(got.dtype, np.uint8)
        self.assertEqual(got.shape, (512, 512))
        self.assertEqual(set(np.unique(got).tolist()) - {0, 255}, set())
        self.assertEqual(int((got != want).sum()), 0, "pixels differing from the reference canny")
        self.assertEqual(int((want > 0).sum()), 14208)


@unittest.skipIf(cv2 is None, "python3-opencv not installed")
class TestCannyOpenCV(unittest.TestCase):
    def assertSameAsCv2(self, img, lo=100.0, hi=200.0, msg=""):
        want = cv2.Canny(np.ascontiguousarray(img), lo, hi)
        got = canny(img, lo, hi)
        self.assertEqual(got.shape, want.shape)
        d = int((got != want).sum())
        self.assertEqual(d, 0, "%s: %d of %d pixels differ from cv2.Canny(%s, %s)" % (msg, d, want.size, lo, hi))

    def test_photos_128(self):
        paths = sorted(glob.glob(os.path.join(FIX, "images", "*.png")))
        self.assertGreaterEqual(len(paths), 5)
        for p in paths:
            self.assertSameAsCv2(rgb(p), msg=os.path.basename(p))

    def test_photo_512_and_other_thresholds(self):
        img = np.array(Image.open(os.path.join(FIX, "resize", "orig_chelsea.png")).resize((512, 512)).convert("RGB"))
        self.assertSameAsCv2(img, msg="chelsea 512")
        self.assertSameAsCv2(img, 50.0, 120.5, msg="chelsea 512")
        self.assertSameAsCv2(img[:300, :451], 200.0, 100.0, msg="swapped thresholds")   # OpenCV swaps them

    def test_channel_order_matters(self):
        # ties between channels go to the first channel: RGB and BGR input differ somewhere on a real photo
        img = rgb(os.path.join(FIX, "images", "astronaut.png"))
        self.assertSameAsCv2(img[:, :, ::-1], msg="BGR")

    def test_synthetic(self):
        rng = np.random.default_rng(0)
        for it in range(120):
            H, W = int(rng.integers(1, 33)), int(rng.integers(1, 33))
            kind = it % 4
            if kind == 0:
                img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
            elif kind == 1:                                   # few levels: many equal magnitudes (NMS ties)
                img = (rng.integers(0, 4, (H, W, 3)) * 60).astype(np.uint8)
            elif kind == 2:                                   # a step touching the image border
                img = np.zeros((H, W, 3), np.uint8)
                img[rng.integers(0, H):, rng.integers(0, W):] = rng.integers(0, 256, 3)
            else:
                img = cv2.GaussianBlur(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), (5, 5), 1.5)
            lo, hi = (100.0, 200.0) if it % 3 == 0 else (float(rng.uniform(0, 300)), float(rng.uniform(0, 400)))
            self.assertSameAsCv2(img, lo, hi, msg="synthetic %d (%dx%d)" % (it, H, W))

    def test_long_weak_chains(self):
        # a serpentine band of weak edges (step 28 → |dx|+|dy| ≤ 168) reachable from one strong spot only
        # through thousands of weak pixels: hysteresis must follow the whole chain
        img = np.zeros((128, 128, 3), np.uint8)
        for i, y in enumerate(range(4, 120, 10)):
            img[y:y + 5, 4:124] = 28
            if y + 10 < 120:
                x = 119 if i % 2 == 0 else 4
                img[y:y + 15, x:x + 5] = 28
        self.assertEqual(int(canny(img).max()), 0)          # no strong pixel, no edge
        img[4:9, 4:12] = 255
        self.assertSameAsCv2(img, msg="serpentine")
        self.assertGreater(int((canny(img) > 0).sum()), 2500)

    def test_shapes(self):
        rng = np.random.default_rng(1)
        batch = rng.integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
        got = canny(batch, 50.0, 150.0)
        self.assertEqual(got.shape, (3, 20, 30))
        for i in range(3):
            self.assertTrue(np.array_equal(got[i], cv2.Canny(batch[i], 50, 150)))
        grey = rng.integers(0, 256, (25, 17), dtype=np.uint8)
        self.assertTrue(np.array_equal(canny(grey[None, :, :, None], 80.0, 160.0)[0], cv2.Canny(grey, 80, 160)))
        self.assertEqual(int(canny(np.full((16, 16, 3), 77, np.uint8)).max()), 0)
        for h, w in [(1, 1), (1, 9), (9, 1), (2, 2)]:
            self.assertSameAsCv2(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 10.0, 20.0, msg="%dx%d" % (h, w))

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA")
    def test_cuda_matches_cpu(self):
        img = rgb(os.path.join(FIX, "images", "chelsea.png"))
        t = torch.from_numpy(img)[None]
        self.assertTrue(torch.equal(ops().canny(t.cuda(), 100.0, 200.0).cpu(), ops().canny(t, 100.0, 200.0)))

    def test_control_image(self):
        img = rgb(os.path.join(FIX, "images", "chelsea.png"))
        c = ops().control_image(ops().canny(torch.from_numpy(img)[None], 100.0, 200.0))
        want = cv2.Canny(img, 100, 200).astype(np.float32) / 255.0
        self.assertEqual(list(c.shape), [1, 3, 128, 128])
        for ch in range(3):
            self.assertTrue(np.array_equal(c[0, ch].numpy(), want))


if __name__ == "__main__":
    unittest.main()
