"""CLIP text encoder parity with transformers CLIPTextModel on the micro model, names vs SD1.5."""
import os
import unittest

import torch

from weights.clip import ClipTextModel, clean_state_dict
from weights.st import load, relerr
from weights.tests.test_vae import ROOT, TOL, load_json, manifest

MICRO = os.path.join(ROOT, "models", "micro-src", "text_encoder")
GOLD = os.path.join(ROOT, "test", "fixtures", "micro", "goldens", "text_encoder.safetensors")
SD15 = os.path.join(ROOT, "weights", "configs", "sd15", "text_encoder.json")


class TestClip(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cfg = load_json(os.path.join(MICRO, "config.json"))
        sd, _ = load(os.path.join(MICRO, "model.safetensors"))
        cls.sd = {k: v.float() for k, v in sd.items()}
        cls.model = ClipTextModel(cls.cfg).eval()
        cls.model.load_state_dict(clean_state_dict(cls.sd), strict=True)
        cls.g, _ = load(GOLD)

    def check(self, m):
        ids, ref = self.g["in.input_ids"], self.g["out.last_hidden_state"]
        with torch.no_grad():
            e = relerr(m(ids), ref)
            self.assertLessEqual(e, TOL, f"last_hidden_state: rel err {e:.3e}")
            # shorter sequences (long-prompt chunks): positions restart at 0, causal => same prefix
            for n in (1, 20, 76):
                e2 = relerr(m(ids[:, :n]), ref[:, :n])
                self.assertLessEqual(e2, TOL, f"prefix {n}: rel err {e2:.3e}")
        return e

    def test_eager_parity(self):
        self.check(self.model)

    def test_scripted_parity(self):
        self.check(torch.jit.script(self.model))

    def test_position_ids_ignored(self):
        sd = dict(self.sd)
        sd["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0) * 3  # broken values
        m = ClipTextModel(self.cfg)
        m.load_state_dict(clean_state_dict(sd), strict=True)
        self.check(m)

    def test_too_long(self):
        m = torch.jit.script(self.model)
        with self.assertRaisesRegex(Exception, "sequence length 78"):
            m(torch.zeros(1, 78, dtype=torch.long))

    def test_sd15_names_and_shapes(self):
        from weights.export import fast_init
        with fast_init():
            m = ClipTextModel(load_json(SD15))
        names = {k: list(v.shape) for k, v in m.state_dict().items()}
        self.assertEqual(names, manifest("text_encoder"))
        self.assertEqual(len(names), 196)


if __name__ == "__main__":
    unittest.main()
