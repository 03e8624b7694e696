"""UNet2DConditionModel vs the reference (diffusers 0.27) goldens of the micro model, eager and scripted."""
import os
import re
import tempfile
import unittest

import torch

from weights.tests.unet_common import (MANIFESTS, MICRO, TOL, build_on_meta, load_goldens, load_json,
                                       load_weights, read_manifest, rel, worst)
from weights.unet import LAYER_IDS_FORWARD, UNet2DConditionModel, layer_shapes

CFG = load_json(os.path.join(MICRO, "unet", "config.json"))


def _module_path(layer_id: str) -> str:
    """'down-level0-repeat1-vit-block0-...' -> 'down_blocks.0.attentions.1.transformer_blocks.0'."""
    m = re.match(r"(down|up)-level(\d+)-repeat(\d+)-vit-block(\d+)-", layer_id)
    assert m, layer_id
    return "%s_blocks.%s.attentions.%s.transformer_blocks.%s" % m.groups()


def _heads_split(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3).reshape(b * heads, n, c // heads)


class UNetGoldens(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.sd = load_weights("unet")
        cls.model = UNet2DConditionModel(CFG).eval()
        cls.model.load_state_dict(cls.sd, strict=True)
        cls.scripted = torch.jit.script(cls.model)
        cls.g = load_goldens("unet.safetensors")
        cls.inputs = (cls.g["in.sample"], cls.g["in.timestep"], cls.g["in.encoder_hidden_states"])
        cls.golden_ids = [k for k in cls.g if not k.startswith("in.") and not k.startswith("out.")]
        cls.ids = LAYER_IDS_FORWARD(CFG)

    def run_model(self, model, capture, down=None, mid=None, inputs=None):
        s, t, e = inputs if inputs is not None else self.inputs
        with torch.no_grad():
            return model(s, t, e, capture, down, mid)

    def check_all(self, model):
        d = self.run_model(model, self.ids)  # every legal id in ONE forward
        self.assertEqual(list(d.keys()), self.ids + ["out"])
        errs = {k: rel(d[k], self.g[k]) for k in self.golden_ids}
        errs["out"] = rel(d["out"], self.g["out.sample"])
        bad = {k: v for k, v in errs.items() if not v <= TOL}
        self.assertEqual(bad, {}, "worst: " + worst(errs))
        self.assertEqual(len(self.golden_ids), 187)
        # the 10 maps of the 64-token layers are not in the compact goldens: recompute them from the
        # reference q/k taps (self) and the reference q with to_k of the text (cross), per docs/method.md §Attention
        missing = [k for k in self.ids if k not in self.g]
        self.assertEqual(len(missing), 10, missing)
        ehs = self.inputs[2]
        merrs = {}
        for k in missing:
            heads = d[k].shape[1]
            base = k[: -len("-self-map")] if k.endswith("-self-map") else k[: -len("-cross-map")]
            q = self.g[base + ("-self-q" if k.endswith("-self-map") else "-cross-q")]
            b, c = q.shape[0], q.shape[1]
            q = q.reshape(b, c, -1).transpose(1, 2)
            if k.endswith("-self-map"):
                kk = self.g[base + "-self-k"].reshape(b, c, -1).transpose(1, 2)
            else:
                kk = ehs @ self.sd[_module_path(k) + ".attn2.to_k.weight"].t()
            qh, kh = _heads_split(q.double(), heads), _heads_split(kk.double(), heads)
            ref = torch.softmax(qh @ kh.transpose(1, 2) * (c // heads) ** -0.5, dim=-1)
            merrs[k] = rel(d[k], ref.reshape(b, heads, q.shape[1], kh.shape[1]))
        bad = {k: v for k, v in merrs.items() if not v <= TOL}
        self.assertEqual(bad, {}, "worst: " + worst(merrs))
        return errs, merrs

    def test_goldens_eager(self):
        errs, merrs = self.check_all(self.model)
        print("\n  eager: %d golden taps + out, max rel %.2e (%s); 10 recomputed maps max rel %.2e"
              % (len(errs) - 1, max(errs.values()), worst(errs, 1), max(merrs.values())))

    def test_goldens_scripted(self):
        errs, merrs = self.check_all(self.scripted)
        print("\n  scripted: %d golden taps + out, max rel %.2e (%s); 10 recomputed maps max rel %.2e"
              % (len(errs) - 1, max(errs.values()), worst(errs, 1), max(merrs.values())))

    def test_preset_subset_and_order(self):
        caps = ["up-level3-repeat0-vit-block0-self-k", "up-level1-repeat1-vit-block0-cross-q",
                "up-level1-repeat2-res-out", "up-level2-repeat1-vit-block0-cross-q"]
        for model in (self.model, self.scripted):
            d = self.run_model(model, caps)
            # forward order regardless of the request order, then 'out'
            self.assertEqual(list(d.keys()), [k for k in self.ids if k in caps] + ["out"])
            for k in caps:
                self.assertLessEqual(rel(d[k], self.g[k]), TOL, k)

    def test_no_capture(self):
        for model in (self.model, self.scripted):
            d = self.run_model(model, [])
            self.assertEqual(list(d.keys()), ["out"])
            self.assertLessEqual(rel(d["out"], self.g["out.sample"]), TOL)

    def test_maps_do_not_change_other_features(self):
        no_maps = [k for k in self.ids if not k.endswith("-map")]
        for model in (self.model, self.scripted):
            a = self.run_model(model, no_maps)
            b = self.run_model(model, self.ids)
            for k in no_maps + ["out"]:
                self.assertLessEqual(rel(a[k], b[k]), TOL, k)

    def test_timestep_forms(self):
        s, t, e = self.inputs
        for model in (self.model, self.scripted):
            ref = self.run_model(model, ["up-level2-upsampler-out"])
            for tt in (t.reshape(()), t.expand(s.shape[0]).clone(), t.float().reshape(())):
                d = self.run_model(model, ["up-level2-upsampler-out"], inputs=(s, tt, e))
                self.assertLessEqual(rel(d["out"], ref["out"]), 1e-6)
                self.assertLessEqual(rel(d["up-level2-upsampler-out"], ref["up-level2-upsampler-out"]), 1e-6)

    def test_unknown_id(self):
        with self.assertRaisesRegex(Exception, "unknown layer id: up-level9-repeat0-res-out"):
            self.run_model(self.model, ["up-level1-repeat2-res-out", "up-level9-repeat0-res-out"])
        with self.assertRaisesRegex(Exception, "unknown layer id: up-level9-repeat0-res-out"):
            self.run_model(self.scripted, ["up-level9-repeat0-res-out"])
        for model in (self.model, self.scripted):
            with self.assertRaisesRegex(Exception, "not spatial.*up-level1-repeat0-vit-block0-cross-k"):
                self.run_model(model, ["up-level1-repeat0-vit-block0-cross-k"])
            with self.assertRaisesRegex(Exception, "not spatial.*mid-vit-block0-cross-v"):
                self.run_model(model, ["mid-vit-block0-cross-v"])
            with self.assertRaisesRegex(Exception, "unknown layer id: vae-out"):
                self.run_model(model, ["vae-out"])

    def test_residuals(self):
        """Zero residuals change nothing; a residual on a skip leaves down and mid-internal taps alone."""
        caps = ["down-level1-repeat1-res-out", "mid-repeat1-res-out", "up-level0-repeat0-res-out"]
        shapes = layer_shapes(CFG, 64)
        skip_shapes = [shapes["unet-after-conv-in"]]
        for L in range(4):
            for r in range(2):
                skip_shapes.append(shapes["down-level%d-repeat%d-res-out" % (L, r)])
            if L < 3:
                skip_shapes.append(shapes["down-level%d-downsampler-out" % L])
        b = self.inputs[0].shape[0]
        zeros = [torch.zeros([b] + s) for s in skip_shapes]
        mid0 = torch.zeros([b] + shapes["mid-repeat1-res-out"])
        ones = [torch.ones([b] + s) for s in skip_shapes]
        for model in (self.model, self.scripted):
            ref = self.run_model(model, caps)
            z = self.run_model(model, caps, zeros, mid0)
            for k in caps + ["out"]:
                self.assertEqual(rel(z[k], ref[k]), 0.0, k)
            o = self.run_model(model, caps, ones, mid0 + 1)
            self.assertEqual(rel(o["down-level1-repeat1-res-out"], ref["down-level1-repeat1-res-out"]), 0.0)
            self.assertEqual(rel(o["mid-repeat1-res-out"], ref["mid-repeat1-res-out"]), 0.0)
            self.assertGreater(rel(o["up-level0-repeat0-res-out"], ref["up-level0-repeat0-res-out"]), 1e-3)
            with self.assertRaisesRegex(Exception, "down_residuals: expected 12"):
                self.run_model(model, caps, zeros[:11], mid0)

    def test_sdpa_path(self):
        """The torch>=2 fast path (SDPACore). On torch 1.13 it is checked eagerly with a stand-in for
        F.scaled_dot_product_attention; on torch 2.x for real, eager and scripted."""
        import torch.nn.functional as F
        from weights import blocks
        stand_in = not blocks.HAS_SDPA
        if stand_in:
            def sdpa(q, k, v):
                return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
            F.scaled_dot_product_attention = sdpa
        try:
            m = UNet2DConditionModel(CFG, use_sdpa=True).eval()
            m.load_state_dict(self.sd, strict=True)
            self.assertIsInstance(m.mid_block.attentions[0].transformer_blocks[0].attn1.core, blocks.SDPACore)
            models = [m] if stand_in else [m, torch.jit.script(m)]
            caps = [k for k in self.golden_ids if not k.endswith("-map")]
            for model in models:
                d = self.run_model(model, caps)
                errs = {k: rel(d[k], self.g[k]) for k in caps}
                errs["out"] = rel(d["out"], self.g["out.sample"])
                self.assertLessEqual(max(errs.values()), TOL, worst(errs))
        finally:
            if stand_in:
                del F.scaled_dot_product_attention

    def test_chunked_attention_cpu(self):
        """MathCore's query slicing (on for large score matrices on the CPU). Forced on for every
        attention layer of the micro UNet (one slice each: n_q is small), eager and scripted, it
        matches the goldens and the unsliced run; on a large input it runs many slices and matches."""
        from weights import blocks
        if blocks.HAS_SDPA:
            self.skipTest("this torch uses SDPACore")
        m = UNet2DConditionModel(CFG).eval()
        m.load_state_dict(self.sd, strict=True)
        cores = [mod for mod in m.modules() if isinstance(mod, blocks.MathCore)]
        self.assertGreater(len(cores), 0)
        caps = [k for k in self.golden_ids if not k.endswith("-map")]
        full = self.run_model(m, caps)
        for c in cores:
            c.chunk_elems = 0
        for model in (m, torch.jit.script(m)):
            d = self.run_model(model, caps)
            errs = {k: rel(d[k], self.g[k]) for k in caps}
            errs["out"] = rel(d["out"], self.g["out.sample"])
            self.assertLessEqual(max(errs.values()), TOL, worst(errs))
            self.assertLessEqual(max(rel(d[k], full[k]) for k in caps + ["out"]), 1e-6)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(4, 3000, 16, generator=g) for _ in range(3))
        # 2 heads: bh = 8, n_k = 3000 -> slices of max(16, 2^20 // 24000) = 43 rows, 70 slices
        sliced = blocks.MathCore(2, chunk_elems=0)
        whole = blocks.MathCore(2, chunk_elems=1 << 40)
        for core in (sliced, torch.jit.script(sliced)):
            self.assertLessEqual(rel(core(q, k, v), whole(q, k, v)), 1e-6)
        self.assertLessEqual(rel(sliced(q[:, :7], k, v), whole(q[:, :7], k, v)), 1e-6)

    def test_jit_save_load(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "unet.pt")
            torch.jit.save(self.scripted, p)
            m = torch.jit.load(p)
        caps = ["up-level1-repeat1-vit-block0-cross-q", "mid-vit-block0-cross-map", "up-level2-upsampler-out"]
        a = self.run_model(m, caps)
        b = self.run_model(self.scripted, caps)
        self.assertEqual(list(a.keys()), list(b.keys()))
        for k in a:
            self.assertTrue(torch.equal(a[k], b[k]), k)
        self.assertEqual(m.layer_id_list(), self.ids)
        with self.assertRaisesRegex(Exception, "unknown layer id: nope"):
            self.run_model(m, ["nope"])

    def test_layer_shapes_micro(self):
        # goldens are at image size 64 (latent 8), batch 2
        shp = layer_shapes(CFG, 64)
        self.assertEqual(list(shp.keys()), self.ids)
        self.assertEqual(len(shp), 197)
        meta = load_json(os.path.join(os.path.dirname(MANIFESTS), "micro", "goldens", "layer_ids.json"))
        self.assertEqual([x["id"] for x in meta["layers"]], self.ids)
        for x in meta["layers"]:
            self.assertEqual(shp[x["id"]], x["shape"][1:], x["id"])
        # and against an actual forward at size 128 (latent 16), every id at once
        torch.manual_seed(1)
        s = torch.randn(1, 4, 16, 16)
        e = torch.randn(1, 77, CFG["cross_attention_dim"])
        d = self.run_model(self.scripted, self.ids, inputs=(s, torch.tensor(10), e))
        shp = layer_shapes(CFG, 128)
        for k in self.ids:
            self.assertEqual(list(d[k].shape), [1] + shp[k], k)
            self.assertTrue(d[k].is_contiguous(), k)
        m = d["up-level3-repeat1-vit-block0-self-map"]
        self.assertLessEqual(float((m.sum(-1) - 1).abs().max()), 1e-5)

    def test_odd_latent_size(self):
        """Latent sizes that are not multiples of 8 (and non-square) run like diffusers (upsample to skip)."""
        torch.manual_seed(2)
        s = torch.randn(1, 4, 12, 10)
        e = torch.randn(1, 77, CFG["cross_attention_dim"])
        caps = ["up-level0-upsampler-out", "up-level2-repeat0-vit-block0-cross-q", "up-level2-upsampler-out",
                "down-level2-downsampler-out", "up-level3-repeat0-vit-block0-self-map"]
        for model in (self.model, self.scripted):
            d = self.run_model(model, caps, inputs=(s, torch.tensor(10), e))
            self.assertEqual(list(d["out"].shape), [1, 4, 12, 10])
            self.assertEqual(list(d["down-level2-downsampler-out"].shape), [1, 32, 2, 2])
            self.assertEqual(list(d["up-level0-upsampler-out"].shape), [1, 32, 3, 3])
            self.assertEqual(list(d["up-level2-repeat0-vit-block0-cross-q"].shape), [1, 32, 6, 5])
            self.assertEqual(list(d["up-level2-upsampler-out"].shape), [1, 32, 12, 10])
            self.assertEqual(list(d["up-level3-repeat0-vit-block0-self-map"].shape), [1, 8, 120, 120])


class UNetRealConfig(unittest.TestCase):
    CFG = load_json(os.path.join(MANIFESTS, "sd15-configs", "unet.json"))

    def test_state_dict_matches_sd15_manifest(self):
        m = build_on_meta(UNet2DConditionModel, self.CFG)
        ours = [(k, list(v.shape)) for k, v in m.state_dict().items()]
        ref = read_manifest("manifest_unet.tsv")
        self.assertEqual(len(ref), 686)
        self.assertEqual(sorted(ours), sorted(ref))
        self.assertEqual(sum(p.numel() for p in m.parameters()), 859520964)

    def test_sd15_layer_ids_and_shapes(self):
        shp = layer_shapes(self.CFG, 512)
        self.assertEqual(len(shp), 197)
        self.assertEqual(list(shp.keys()), LAYER_IDS_FORWARD(self.CFG))
        self.assertFalse(any("cross-k" in k or "cross-v" in k for k in shp))
        expect = {
            "unet-in": [4, 64, 64], "unet-after-conv-in": [320, 64, 64], "unet-out": [4, 64, 64],
            "up-level0-upsampler-out": [1280, 16, 16], "up-level1-repeat1-vit-block0-cross-q": [1280, 16, 16],
            "up-level1-repeat2-res-out": [1280, 16, 16], "up-level1-upsampler-out": [1280, 32, 32],
            "up-level2-repeat1-vit-block0-cross-q": [640, 32, 32], "up-level2-upsampler-out": [640, 64, 64],
            "up-level3-repeat0-vit-block0-self-k": [320, 64, 64], "up-level3-repeat2-vit-out": [320, 64, 64],
            "mid-vit-out": [1280, 8, 8], "down-level0-repeat0-vit-block0-ffn-inner": [1280, 64, 64],
            "up-level1-repeat0-vit-block0-cross-map": [8, 256, 77],
            "up-level3-repeat0-vit-block0-self-map": [8, 4096, 4096],
            "down-level3-repeat1-res-out": [1280, 8, 8], "down-level2-downsampler-out": [1280, 8, 8],
        }
        for k, v in expect.items():
            self.assertEqual(shp[k], v, k)
        self.assertEqual(layer_shapes(self.CFG, 256)["up-level2-upsampler-out"], [640, 32, 32])

    def test_unsupported_config_is_an_error(self):
        cfg = dict(self.CFG, class_embed_type="timestep")
        with self.assertRaisesRegex(ValueError, "class_embed_type"):
            UNet2DConditionModel(cfg)


if __name__ == "__main__":
    unittest.main()
