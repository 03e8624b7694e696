"""weights/ops/ (models/ops.pt): scheduler, latent prep, packaging, LoRA merge and analysis helpers, against
the reference goldens (diffusers PNDMScheduler etc.) and against independent numpy computations."""
import json
import os
import unittest

import numpy as np
import torch
import torch.nn.functional as F

from weights.ops import METHODS, script, source_sha256
from weights.st import load

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "test", "fixtures")
SCHED = os.path.join(FIX, "micro", "goldens", "scheduler.safetensors")
CASE1 = os.path.join(FIX, "micro", "e2e", "case1_legacy.safetensors")
CASE4 = os.path.join(FIX, "micro", "e2e", "case4_controlnet_multistep_attn.safetensors")
LORA = os.path.join(FIX, "lora")
OPS_PT = os.path.join(ROOT, "models", "ops.pt")

_OPS = None


def ops():
    global _OPS
    if _OPS is None:
        _OPS = script()
    return _OPS


def rel(a, b):
    a = a.double()
    b = b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


class TestCommittedOpsPt(unittest.TestCase):
    def test_ops_pt_up_to_date(self):
        """models/ops.pt must be the scripted current weights/ops/ (run `python3 -m weights.ops --out models/ops.pt`)."""
        self.assertTrue(os.path.exists(OPS_PT), "models/ops.pt missing")
        extra = {"ops_source_sha256": "", "torch_version": ""}
        loaded = torch.jit.load(OPS_PT, _extra_files=extra)
        self.assertEqual(extra["ops_source_sha256"].decode(), source_sha256(),
                         "models/ops.pt is stale: re-run python3 -m weights.ops --out models/ops.pt")
        fresh = ops()
        for name in METHODS:
            self.assertTrue(hasattr(loaded, name), name)
        # and it computes the same thing
        x = torch.randint(0, 256, (1, 9, 11, 3), dtype=torch.uint8)
        self.assertTrue(torch.equal(loaded.preprocess(x), fresh.preprocess(x)))
        self.assertTrue(torch.equal(loaded.canny(x, 100.0, 200.0), fresh.canny(x, 100.0, 200.0)))


class TestScheduler(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.g, _ = load(SCHED)

    def test_tables(self):
        g = self.g
        self.assertLessEqual(rel(ops().betas(), g["betas"]), 1e-6)
        self.assertLessEqual(rel(ops().alphas_cumprod(), g["alphas_cumprod"]), 1e-6)
        acp = ops().alphas_cumprod()
        for t, v in [(1, 0.998296), (50, 0.951577), (51, 0.950524), (60, 0.940875), (61, 0.939783)]:
            self.assertAlmostEqual(float(acp[t]), v, delta=1e-6)

    def test_add_noise(self):
        g = self.g
        for t in [1, 50, 51, 60, 61]:
            out = ops().add_noise(g["in.x0"], g["in.noise"], t)
            self.assertLessEqual(rel(out, g["add_noise.t%d" % t]), 1e-6, t)
        # batch: same t for every row; dtype preserved (ᾱ cast to the sample dtype first)
        x = torch.cat([g["in.x0"], 2 * g["in.x0"]])
        n = torch.cat([g["in.noise"], g["in.noise"]])
        out = ops().add_noise(x, n, 51)
        self.assertLessEqual(rel(out[0:1], g["add_noise.t51"]), 1e-6)
        h = ops().add_noise(g["in.x0"].half(), g["in.noise"].half(), 51)
        self.assertEqual(h.dtype, torch.float16)
        a = ops().alphas_cumprod().half()[51]
        want = a ** 0.5 * g["in.x0"].half() + (1 - a) ** 0.5 * g["in.noise"].half()
        self.assertTrue(torch.equal(h, want))
        with self.assertRaises(Exception):
            ops().add_noise(g["in.x0"], g["in.noise"], 1000)

    def test_timesteps(self):
        self.assertEqual(ops().plms_timesteps(60, 50), self.g["plms.timesteps"].tolist())
        self.assertEqual(ops().plms_timesteps(60, 50), list(range(61, 49, -1)))
        self.assertEqual(ops().plms_timesteps(10, 0), list(range(11, 0, -1)))   # entries ≥ 0: 11..1
        self.assertEqual(ops().plms_timesteps(60, 10), list(range(61, 9, -1)))
        full = self.g["timesteps_1000"].tolist()
        for t in [0, 1, 2, 49, 50, 51, 500, 997, 998, 999]:
            self.assertEqual(ops().unet_timestep(t, "reference"), full[1000 - t], t)
            self.assertEqual(ops().unet_timestep(t, "exact"), t)
        self.assertEqual(ops().unet_timestep(50, "reference"), 51)
        self.assertEqual(ops().unet_timestep(998, "reference"), 999)
        self.assertEqual(ops().unet_timestep(999, "reference"), 999)
        for bad in [(1000, "reference"), (-1, "exact"), (50, "nope")]:
            with self.assertRaises(Exception):
                ops().unet_timestep(*bad)
        for bad in [(50, 50), (120, 50), (1000, 950)]:
            with self.assertRaises(Exception):
                ops().plms_timesteps(*bad)

    def test_plms_steps(self):
        g = self.g
        x = g["plms.x_init"]
        ets, counter, cur = [], 0, None
        worst = 0.0
        for k, ts in enumerate(g["plms.timesteps"].tolist()):
            x, ets, counter, cur = ops().plms_step(g["plms.step%d.eps" % k], ts, x, ets, counter, cur)
            e = rel(x, g["plms.step%d.prev_sample" % k])
            worst = max(worst, e)
            self.assertLessEqual(e, 1e-6, "step %d (t=%d)" % (k, ts))
            self.assertEqual(counter, k + 1)
            self.assertLessEqual(len(ets), 4)
            self.assertEqual(cur is None, k != 0)

    def test_plms_e2e_case4(self):
        """case 4's recorded ε̂ per denoising step → the recorded latents and the extraction latent."""
        d, _ = load(CASE4)
        steps = d["ref.denoise.timesteps"].tolist()
        self.assertEqual(steps, ops().plms_timesteps(60, 50)[:-1])
        self.assertEqual(int(d["ref.noise_timestep"][0]), ops().plms_timesteps(60, 50)[0])
        self.assertEqual(int(d["ref.timestep"][0]), ops().plms_timesteps(60, 50)[-1])
        z0 = ops().posterior(d["ref.posterior_mean"], d["ref.posterior_logvar"], d["input.vae_noise"], True, 0.18215)
        self.assertLessEqual(rel(z0, d["ref.latents_clean"]), 1e-6)
        x = ops().add_noise(z0, d["input.noise"], steps[0])
        self.assertLessEqual(rel(x, d["ref.noisy_latent"]), 1e-6)
        ets, counter, cur = [], 0, None
        for k, ts in enumerate(steps):
            self.assertLessEqual(rel(x, d["ref.denoise.step%d.latent" % k]), 1e-6, k)
            x, ets, counter, cur = ops().plms_step(d["ref.denoise.step%d.noise_pred" % k], ts, x, ets, counter, cur)
        self.assertLessEqual(rel(x, d["ref.extraction_latent"]), 1e-6)

    def test_posterior_mean(self):
        m = torch.randn(2, 4, 3, 3)
        lv = torch.randn(2, 4, 3, 3)
        self.assertTrue(torch.equal(ops().posterior(m, lv, None, False, 0.18215), 0.18215 * m))
        n = torch.randn(2, 4, 3, 3)
        want = 0.5 * (m + torch.exp(0.5 * lv.clamp(-30, 20)) * n)
        self.assertTrue(torch.equal(ops().posterior(m, lv, n, True, 0.5), want))
        with self.assertRaises(Exception):
            ops().posterior(m, lv, None, True, 0.18215)

    def test_ddim_step(self):
        acp = ops().alphas_cumprod().double()
        x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
        eps = torch.randn(1, 4, 5, 5, dtype=torch.float64)
        for t, prev in [(61, 60), (51, 50), (10, 0), (5, -1)]:
            at = acp[t]
            ap = acp[prev] if prev >= 0 else acp[0]
            x0 = (x - (1 - at).sqrt() * eps) / at.sqrt()
            want = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
            got = ops().ddim_step(eps.float(), t, prev, x.float())
            self.assertEqual(got.dtype, torch.float32)
            self.assertLessEqual(rel(got, want), 1e-6)
        # DDIM with ε from the true noise recovers the exact lower-noise latent
        z0 = torch.randn(1, 4, 5, 5)
        n = torch.randn(1, 4, 5, 5)
        xt = ops().add_noise(z0, n, 61)
        self.assertLessEqual(rel(ops().ddim_step(n, 61, 50, xt), ops().add_noise(z0, n, 50)), 1e-5)


class TestImageOps(unittest.TestCase):
    def test_preprocess(self):
        u8 = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
        out = ops().preprocess(u8)
        self.assertEqual(list(out.shape), [2, 3, 5, 7])
        self.assertEqual(out.dtype, torch.float32)
        self.assertTrue(out.is_contiguous(memory_format=torch.channels_last))  # NHWC strides, like diffusers
        want = 2.0 * (u8.numpy().astype(np.float32) / 255.0) - 1.0     # diffusers VaeImageProcessor
        self.assertTrue(np.array_equal(out.numpy(), want.transpose(0, 3, 1, 2)))
        self.assertEqual(float(ops().preprocess(torch.full((1, 1, 1, 3), 255, dtype=torch.uint8)).min()), 1.0)
        self.assertEqual(float(ops().preprocess(torch.zeros((1, 1, 1, 3), dtype=torch.uint8)).max()), -1.0)

    def test_control_image(self):
        e = (torch.rand(2, 6, 5) > 0.5).to(torch.uint8) * 255
        c = ops().control_image(e)
        self.assertEqual(list(c.shape), [2, 3, 6, 5])
        self.assertEqual(c.dtype, torch.float32)
        for ch in range(3):
            self.assertTrue(torch.equal(c[:, ch], e.float() / 255.0))


class TestFeatureOps(unittest.TestCase):
    def test_package_case1(self):
        d, _ = load(CASE1)
        ids = ["up-level0-upsampler-out", "up-level1-upsampler-out", "up-level2-upsampler-out", "up-level3-repeat2-vit-out"]
        self.assertTrue(torch.equal(ops().package([d[i] for i in ids]), d["packaged"]))

    def test_package_case4_with_attn(self):
        d, _ = load(CASE4)
        ids = ["up-level0-upsampler-out", "up-level1-upsampler-out", "up-level2-upsampler-out", "up-level3-repeat2-vit-out"]
        attn = d["packaged"][:, 112:]
        self.assertTrue(torch.equal(ops().package([d[i] for i in ids] + [attn]), d["packaged"]))

    def test_package_nearest(self):
        a = torch.randn(2, 3, 2, 2)
        b = torch.randn(2, 5, 8, 8).half()
        out = ops().package([a.half(), b])
        self.assertEqual(list(out.shape), [2, 8, 8, 8])
        self.assertTrue(torch.equal(out[:, :3], a.half().repeat_interleave(4, 2).repeat_interleave(4, 3)))
        self.assertTrue(torch.equal(out[:, 3:], b))

    def _ref_aggregate(self, maps, latent, min_q, max_q):
        groups = {}
        for m in maps:
            nq = m.shape[2]
            if min_q <= nq <= max_q:
                groups.setdefault(nq, []).append(m.mean(1))
        outs = []
        for nq, lst in groups.items():
            avg = np.mean(np.stack(lst), 0)
            h = int(round(nq ** 0.5))
            g = avg.transpose(0, 2, 1).reshape(avg.shape[0], avg.shape[2], h, h)
            rep = latent // h
            outs.append(g.repeat(rep, 2).repeat(rep, 3))
        return np.concatenate(outs, 1)

    def test_aggregate_attention_golden_maps(self):
        """The six up_cross maps of the UNet golden (16² latent 8: nq 4 and 16) — GATE keeps 16²..32² of 64²."""
        g, _ = load(os.path.join(FIX, "micro", "goldens", "unet.safetensors"))
        ids = ["up-level1-repeat%d-vit-block0-cross-map" % r for r in range(3)] + \
              ["up-level2-repeat%d-vit-block0-cross-map" % r for r in range(3)]
        maps = [g[i] for i in ids if i in g]
        self.assertEqual(len(maps), 6)
        latent = 8
        out = ops().aggregate_attention(maps, latent, 4, 16)      # (64/32)² .. (64/16)² for a 64 px image
        self.assertEqual(list(out.shape), [2, 154, latent, latent])
        want = self._ref_aggregate([m.double().numpy() for m in maps], latent, 4, 16)
        self.assertLessEqual(float(np.abs(out.double().numpy() - want).max() / np.abs(want).max()), 1e-6)
        # each pixel's 77 token probabilities sum to 1 within each half
        s = out.reshape(2, 2, 77, latent, latent).sum(2)
        self.assertLessEqual(float((s - 1).abs().max()), 1e-5)
        # the filter: only the 4-query maps
        only = ops().aggregate_attention(maps, latent, 1, 4)
        self.assertEqual(list(only.shape), [2, 77, latent, latent])
        self.assertTrue(torch.allclose(only, out[:, :77]))

    def test_aggregate_attention_order_and_dtype(self):
        torch.manual_seed(0)
        mk = lambda nq: torch.softmax(torch.randn(1, 4, nq, 6), -1)
        maps = [mk(64), mk(16), mk(256), mk(16), mk(64), mk(4)]
        out = ops().aggregate_attention(maps, 16, 16, 64)
        want = self._ref_aggregate([m.double().numpy() for m in maps], 16, 16, 64)
        self.assertEqual(list(out.shape), [1, 12, 16, 16])          # 64 group first (first seen), then 16
        self.assertLessEqual(float(np.abs(out.double().numpy() - want).max()), 1e-6)
        self.assertEqual(ops().aggregate_attention([m.half() for m in maps], 16, 16, 64).dtype, torch.float16)
        with self.assertRaises(Exception):
            ops().aggregate_attention(maps, 16, 1000, 2000)

    def test_feature_resize(self):
        x = torch.randn(2, 3, 8, 12)
        self.assertTrue(torch.equal(ops().feature_resize(x, 1), x))
        out = ops().feature_resize(x, 2)
        self.assertTrue(torch.allclose(out, F.avg_pool2d(x, 2)))
        m = torch.randn(1, 2, 64, 77)
        self.assertTrue(torch.equal(ops().feature_resize(m, 4), F.adaptive_avg_pool2d(m, (16, 19))))

    def test_split_to_cpu(self):
        d = {"b": torch.randn(3, 2, 4, 4).half(), "a": torch.randn(3, 5, 2, 2), "attn": torch.randn(3, 1, 4, 4)}
        out = ops().split_to_cpu(d)
        self.assertEqual(len(out), 3)
        for i, di in enumerate(out):
            self.assertEqual(list(di.keys()), ["b", "a", "attn"])
            for k, v in di.items():
                self.assertEqual(v.dtype, torch.float32)
                self.assertEqual(v.device.type, "cpu")
                self.assertTrue(v.is_contiguous())
                self.assertEqual(v.storage_offset(), 0)
                self.assertTrue(torch.equal(v, d[k][i].float()))

    def test_rows_cat_repeat(self):
        x = torch.randn(5, 4, 2, 2)
        self.assertTrue(torch.equal(ops().rows(x, 1, 3), x[1:4]))
        with self.assertRaises(Exception):
            ops().rows(x, 3, 3)
        self.assertTrue(torch.equal(ops().cat([x, x], 1), torch.cat([x, x], 1)))
        e = torch.randn(1, 77, 16)
        r = ops().repeat_batch(e, 3)
        self.assertEqual(list(r.shape), [3, 77, 16])
        self.assertTrue(torch.equal(r[2], e[0]))


def _kohya_key(module):
    return "lora_unet_" + module.replace(".", "_")


class TestLoraMerge(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with open(os.path.join(LORA, "cases.json")) as f:
            cls.cases = json.load(f)
        cls.g, _ = load(os.path.join(LORA, "lora_goldens.safetensors"))
        cls.files = {}
        for f in ["kohya_locon.safetensors", "kohya_lora_attn_only.safetensors", "diffusers_peft.safetensors"]:
            cls.files[f], _ = load(os.path.join(LORA, f))

    def _factors(self, fname, param):
        sd = self.files[fname]
        module = param[: -len(".weight")]
        if fname.startswith("kohya"):
            k = _kohya_key(module)
            if k + ".lora_down.weight" not in sd:
                return None
            down, up = sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"]
            r = down.shape[0]
            alpha = float(sd[k + ".alpha"]) if k + ".alpha" in sd else float(r)
            return up, down, alpha / r
        k = "unet." + module
        if k + ".lora_A.weight" not in sd:
            return None
        return sd[k + ".lora_B.weight"], sd[k + ".lora_A.weight"], 1.0

    def test_goldens(self):
        params = self.cases["representative_params"]
        n = 0
        for case in self.cases["cases"]:
            for p in params:
                ups, downs, scales = [], [], []
                for lo in case["loras"]:
                    f = self._factors(lo["file"], p)
                    if f is None:
                        continue
                    ups.append(f[0])
                    downs.append(f[1])
                    scales.append(float(lo["scale"]) * f[2])
                w = self.g["base.param." + p]
                got = ops().lora_merge(w, ups, downs, scales)
                want = self.g[case["name"] + ".merged." + p]
                self.assertEqual(got.dtype, w.dtype)
                self.assertEqual(got.shape, w.shape)
                err = float((got.double() - want.double()).abs().max())
                self.assertLessEqual(err, 1e-7 * float(want.abs().max()), (case["name"], p, err))
                n += 1
        self.assertEqual(n, len(self.cases["cases"]) * len(params))

    def test_shapes_and_rounding(self):
        torch.manual_seed(1)
        w = torch.randn(8, 8, 1, 1).half()
        up, down = torch.randn(8, 2, 1, 1), torch.randn(2, 8, 1, 1)
        d = (up.double().reshape(8, 2) @ down.double().reshape(2, 8))
        want = (w.double() + 0.3 * d.reshape(8, 8, 1, 1)).half()
        self.assertTrue(torch.equal(ops().lora_merge(w, [up], [down], [0.3]), want))
        # (C,C) weight with (C,r,1,1)/(r,C,1,1) factors and vice versa
        self.assertTrue(torch.equal(ops().lora_merge(w.reshape(8, 8), [up], [down], [0.3]), want.reshape(8, 8)))
        self.assertTrue(torch.equal(ops().lora_merge(w, [up.reshape(8, 2)], [down.reshape(2, 8)], [0.3]), want))
        # 3×3 conv and two LoRAs
        w3 = torch.randn(6, 4, 3, 3)
        u1, d1 = torch.randn(6, 3, 1, 1), torch.randn(3, 4, 3, 3)
        u2, d2 = torch.randn(6, 2), torch.randn(2, 36)
        want3 = (w3.double() + 0.7 * (u1.double().reshape(6, 3) @ d1.double().reshape(3, 36)).reshape(6, 4, 3, 3)
                 + 0.2 * (u2.double() @ d2.double()).reshape(6, 4, 3, 3)).float()
        self.assertTrue(torch.equal(ops().lora_merge(w3, [u1, u2], [d1, d2], [0.7, 0.2]), want3))
        self.assertTrue(torch.equal(ops().lora_merge(w3, [], [], []), w3))
        with self.assertRaises(Exception):
            ops().lora_merge(w3, [torch.randn(5, 3)], [torch.randn(3, 36)], [1.0])


class TestAnalysisOps(unittest.TestCase):
    def _np_pca(self, x):
        C, H, W = x.shape
        X = x.reshape(C, -1).T.astype(np.float64)
        X = X - X.mean(0)
        U, S, Vt = np.linalg.svd(X, full_matrices=False)
        U, S = U[:, :3], S[:3]
        signs = np.sign(U[np.argmax(np.abs(U), axis=0), range(3)])   # sklearn svd_flip, u-based
        T = U * S * signs
        T = (T - T.min(0)) / (T.max(0) - T.min(0))
        return (T * 255).astype(np.uint8).reshape(H, W, 3), (T * 255).reshape(H, W, 3)

    def test_pca_rgb(self):
        rng = np.random.default_rng(0)
        for C, H in [(8, 6), (40, 16), (320, 32)]:
            # structured data: a few strong directions plus noise
            base = rng.standard_normal((5, H * H)) * np.array([[9.0], [5.0], [3.0], [1.0], [0.5]])
            mix = rng.standard_normal((C, 5))
            x = (mix @ base + 0.1 * rng.standard_normal((C, H * H))).reshape(C, H, H).astype(np.float32)
            got = ops().pca_rgb(torch.from_numpy(x))
            self.assertEqual(got.dtype, torch.uint8)
            self.assertEqual(list(got.shape), [H, H, 3])
            want, raw = self._np_pca(x)
            diff = np.abs(got.numpy().astype(int) - want.astype(int))
            # identical except where the ×255 value sits on an integer boundary (truncation)
            near = np.abs(raw - np.round(raw)) < 1e-6
            self.assertLessEqual(int(diff.max()), 1, (C, H))
            self.assertTrue(np.all((diff == 0) | near), (C, H))

    def test_pca_rgb_power_iteration_path(self):
        """min(H·W, C) > 2048: block power iteration. Exactly rank-5 data, whose PCA numpy gets cheaply from
        the factors (QR of both, SVD of the 5×5 core)."""
        rng = np.random.default_rng(3)
        C, H = 2100, 46
        A = rng.standard_normal((H * H, 5)) * np.array([9.0, 5.0, 3.0, 1.0, 0.5])
        B = rng.standard_normal((5, C))
        x = (A @ B).T.reshape(C, H, H)
        got = ops().pca_rgb(torch.from_numpy(x.astype(np.float32))).numpy()
        Ac = A - A.mean(0)
        Qa, Ra = np.linalg.qr(Ac)
        Qb, Rb = np.linalg.qr(B.T)
        Um, Sm, _ = np.linalg.svd(Ra @ Rb.T)
        U = (Qa @ Um)[:, :3]
        T = U * Sm[:3] * np.sign(U[np.argmax(np.abs(U), axis=0), range(3)])
        T = (T - T.min(0)) / (T.max(0) - T.min(0))
        want = (T * 255).astype(np.uint8).reshape(H, H, 3)
        diff = np.abs(got.astype(int) - want.astype(int))
        self.assertLessEqual(int(diff.max()), 1)
        self.assertLess(float((diff > 0).mean()), 0.01)

    def test_laplacian_map(self):
        rng = np.random.default_rng(1)
        x = rng.standard_normal((5, 7, 9)).astype(np.float32)
        p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge").astype(np.float64)
        lap = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] - 4 * p[:, 1:-1, 1:-1]
        want = np.sqrt((lap ** 2).sum(0))
        got = ops().laplacian_map(torch.from_numpy(x))
        self.assertEqual(list(got.shape), [7, 9])
        self.assertLessEqual(float(np.abs(got.double().numpy() - want).max()), 1e-5)

    def _np_correspondence(self, f1, f2, src, S):
        C = f1.shape[0]
        u1 = F.interpolate(f1[None], (S, S), mode="bilinear", align_corners=False)[0].double().numpy()
        u2 = F.interpolate(f2[None], (S, S), mode="bilinear", align_corners=False)[0].double().numpy()
        d1 = u1.reshape(C, -1).T
        d2 = u2.reshape(C, -1).T
        d1 = d1 / np.linalg.norm(d1, axis=1, keepdims=True)
        d2 = d2 / np.linalg.norm(d2, axis=1, keepdims=True)
        y = np.round(np.clip(src[:, 0].numpy(), 0, S - 1))
        x = np.round(np.clip(src[:, 1].numpy(), 0, S - 1))
        idx = (S * y + x).astype(int)
        best = (d1[idx] @ d2.T).argmax(1)
        return np.stack([best // S, best % S], 1).astype(np.float32), y, x

    def test_correspondence(self):
        """correspondence_utils.py literally (numpy, float64) vs ops.correspondence."""
        torch.manual_seed(2)
        C, h, S = 6, 8, 32
        f1 = torch.randn(C, h, h)
        f2 = torch.randn(C, h, h)
        src = torch.tensor([[0.0, 0.0], [3.5, 4.5], [31.7, 12.2], [-3.0, 40.0], [10.49, 20.51], [2.5, 2.5]])
        got = ops().correspondence(f1, f2, src, S)
        want, y, x = self._np_correspondence(f1, f2, src, S)
        self.assertEqual(list(got.shape), [6, 2])
        self.assertEqual(got.dtype, torch.float32)
        self.assertTrue(np.array_equal(got.numpy(), want))
        self.assertEqual(y.tolist()[1:3] + x.tolist()[1:3], [4.0, 32.0 - 1, 4.0, 12.0])   # half-to-even, clip
        # identical maps: interior points map to themselves
        inner = torch.tensor([[5.0, 6.0], [13.0, 20.0], [22.0, 9.0]])
        same = ops().correspondence(f1, f1, inner, S)
        self.assertTrue(np.array_equal(same.numpy(), inner.numpy()))
        # more than one keypoint chunk
        big = torch.randn(300, 2) * 12 + 16
        self.assertTrue(np.array_equal(ops().correspondence(f1, f2, big, S).numpy(),
                                       self._np_correspondence(f1, f2, big, S)[0]))

    def test_correspondence_512_channel_chunks(self):
        """At 512² the channels are processed in chunks (70 channels → 64 + 6); fp16 inputs accepted."""
        torch.manual_seed(3)
        f1 = torch.randn(70, 16, 16)
        f2 = torch.randn(70, 16, 16)
        src = torch.tensor([[100.2, 37.0], [511.0, 0.0], [250.5, 250.5], [17.0, 400.0]])
        got = ops().correspondence(f1, f2, src, 512)
        want, _, _ = self._np_correspondence(f1, f2, src, 512)
        self.assertTrue(np.array_equal(got.numpy(), want))
        self.assertEqual(list(ops().correspondence(f1.half(), f2.half(), src, 512).shape), [4, 2])


if __name__ == "__main__":
    unittest.main()
