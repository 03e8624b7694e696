"""ControlNetModel vs the reference (diffusers 0.27) goldens of the micro model, and the UNet with its residuals."""
import os
import tempfile
import unittest

import torch

from weights.controlnet import ControlNetModel
from weights.tests.unet_common import (MANIFESTS, MICRO, TOL, build_on_meta, load_goldens, load_json,
                                       load_weights, read_manifest, rel, worst)
from weights.unet import UNet2DConditionModel

CFG = load_json(os.path.join(MICRO, "controlnet", "config.json"))
UCFG = load_json(os.path.join(MICRO, "unet", "config.json"))
PREFIX = "unet_with_controlnet."


class ControlNetGoldens(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = ControlNetModel(CFG).eval()
        cls.model.load_state_dict(load_weights("controlnet"), strict=True)
        cls.scripted = torch.jit.script(cls.model)
        cls.unet = UNet2DConditionModel(UCFG).eval()
        cls.unet.load_state_dict(load_weights("unet"), strict=True)
        cls.sunet = torch.jit.script(cls.unet)
        cls.g = load_goldens("controlnet.safetensors")
        g = cls.g
        cls.inputs = (g["in.sample"], g["in.timestep"], g["in.encoder_hidden_states"], g["in.controlnet_cond"])
        cls.refs = [g["out.down_block_res_samples.%d" % i] for i in range(12)] + [g["out.mid_block_res_sample"]]

    def run_cn(self, model, scale=1.0, inputs=None):
        s, t, e, c = inputs if inputs is not None else self.inputs
        with torch.no_grad():
            return model(s, t, e, c, scale)

    def test_residuals_eager_and_scripted(self):
        for name, model in (("eager", self.model), ("scripted", self.scripted)):
            r = self.run_cn(model)
            self.assertEqual(len(r), 13)
            errs = {"res%d" % i: rel(r[i], self.refs[i]) for i in range(13)}
            with torch.no_grad():
                errs["cond_embedding"] = rel(model.conditioning(self.inputs[3]),
                                             self.g["controlnet.controlnet_cond_embedding.out"])
            bad = {k: v for k, v in errs.items() if not v <= TOL}
            self.assertEqual(bad, {}, worst(errs))
            print("\n  %s controlnet: 12 down + mid residuals + cond embedding, max rel %.2e"
                  % (name, max(errs.values())))

    def test_unet_with_controlnet(self):
        ids = [k[len(PREFIX):] for k in self.g if k.startswith(PREFIX) and k != PREFIX + "out.sample"]
        for name, cn, unet in (("eager", self.model, self.unet), ("scripted", self.scripted, self.sunet)):
            r = self.run_cn(cn)
            s, t, e, _ = self.inputs
            with torch.no_grad():
                d = unet(s, t, e, ids, r[:12], r[12])
            errs = {k: rel(d[k], self.g[PREFIX + k]) for k in ids}
            errs["out"] = rel(d["out"], self.g[PREFIX + "out.sample"])
            bad = {k: v for k, v in errs.items() if not v <= TOL}
            self.assertEqual(bad, {}, worst(errs))
            print("\n  %s unet+controlnet: %d taps + out, max rel %.2e" % (name, len(ids), max(errs.values())))

    def test_conditioning_scale(self):
        for model in (self.model, self.scripted):
            a = self.run_cn(model, 1.0)
            b = self.run_cn(model, 0.5)
            z = self.run_cn(model, 0.0)
            for x, y, w in zip(a, b, z):
                self.assertLessEqual(rel(y, x * 0.5), 1e-6)
                self.assertEqual(float(w.abs().max()), 0.0)

    def test_timestep_forms(self):
        s, t, e, c = self.inputs
        a = self.run_cn(self.scripted)
        b = self.run_cn(self.scripted, inputs=(s, t.reshape(()), e, c))
        for x, y in zip(a, b):
            self.assertTrue(torch.equal(x, y))

    def test_jit_save_load(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "controlnet.pt")
            torch.jit.save(self.scripted, p)
            m = torch.jit.load(p)
        for x, y in zip(self.run_cn(m), self.run_cn(self.scripted)):
            self.assertTrue(torch.equal(x, y))


class ControlNetRealConfig(unittest.TestCase):
    def test_state_dict_matches_sd15_canny_manifest(self):
        cfg = load_json(os.path.join(MANIFESTS, "sd15-configs", "controlnet.json"))
        m = build_on_meta(ControlNetModel, cfg)
        ours = [(k, list(v.shape)) for k, v in m.state_dict().items()]
        ref = read_manifest("manifest_controlnet.tsv")
        self.assertEqual(len(ref), 340)
        self.assertEqual(sorted(ours), sorted(ref))
        self.assertEqual(sum(p.numel() for p in m.parameters()), 361279120)


if __name__ == "__main__":
    unittest.main()
