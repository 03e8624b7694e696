"""VAE parity with the reference (diffusers AutoencoderKL) on the micro model, names vs SD1.5."""
import gzip
import json
import os
import unittest

import torch

from weights.st import load, relerr
from weights.vae import VaeDecoder, VaeEncoder, normalize_state_dict, split_state_dict

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MICRO = os.path.join(ROOT, "models", "micro-src", "vae")
GOLD = os.path.join(ROOT, "test", "fixtures", "micro", "goldens", "vae.safetensors")
KEYMAP = os.path.join(ROOT, "test", "fixtures", "ldm", "key_map_sd15.tsv.gz")
SD15 = os.path.join(ROOT, "weights", "configs", "sd15", "vae.json")
TOL = 1e-5


def load_json(path):
    with open(path) as f:
        return json.load(f)


def micro_vae():
    cfg = load_json(os.path.join(MICRO, "config.json"))
    sd, _ = load(os.path.join(MICRO, "diffusion_pytorch_model.safetensors"))
    enc_sd, dec_sd, rest = split_state_dict({k: v.float() for k, v in sd.items()})
    assert not rest, rest
    enc, dec = VaeEncoder(cfg).eval(), VaeDecoder(cfg).eval()
    enc.load_state_dict(enc_sd, strict=True)
    dec.load_state_dict(dec_sd, strict=True)
    return cfg, sd, enc, dec


def manifest(component):
    """diffusers (name -> shape) of the full SD1.5 component, from the LDM key map."""
    prefix = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
              "text_encoder": "cond_stage_model.transformer."}[component]
    out = {}
    with gzip.open(KEYMAP, "rt") as f:
        for line in f:
            if line.startswith("#"):
                continue
            ldm, dk, _ls, ds, _note = line.rstrip("\n").split("\t")
            if dk != "-" and ldm.startswith(prefix):
                out[dk] = [int(x) for x in ds.split(",")] if ds != "scalar" else []
    return out


class TestVae(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.cfg, cls.sd, cls.enc, cls.dec = micro_vae()
        cls.g, _ = load(GOLD)

    def check(self, enc, dec):
        g = self.g
        with torch.no_grad():
            mean, logvar = enc(g["in.image"])
            image = dec(g["in.decoder_latent"])
        errs = {"mean": relerr(mean, g["out.latent_dist.mean"]),
                "logvar": relerr(logvar, g["out.latent_dist.logvar"]),
                "sample": relerr(mean + torch.exp(0.5 * logvar) * g["in.sample_noise"], g["out.latent_sample"]),
                "decoded": relerr(image, g["out.decoded"])}
        for k, e in errs.items():
            self.assertLessEqual(e, TOL, f"{k}: rel err {e:.3e}")
        return errs

    def test_eager_parity(self):
        self.check(self.enc, self.dec)

    def test_scripted_parity(self):
        enc, dec = torch.jit.script(self.enc), torch.jit.script(self.dec)
        self.check(enc, dec)
        self.assertEqual(len(enc(torch.zeros(2, 3, 16, 16))), 2)

    def test_logvar_clamped(self):
        enc = torch.jit.script(self.enc)
        with torch.no_grad():
            enc.quant_conv.bias[4:] += 1000.0
            _, lv = enc(self.g["in.image"])
            enc.quant_conv.bias[4:] -= 2000.0
            _, lv2 = enc(self.g["in.image"])
            enc.quant_conv.bias[4:] += 1000.0
        self.assertEqual(float(lv.min()), 20.0)
        self.assertEqual(float(lv2.max()), -30.0)

    def test_bad_shape_message(self):
        enc = torch.jit.script(self.enc)
        with self.assertRaisesRegex(Exception, "expected image"):
            enc(torch.zeros(1, 4, 16, 16))

    def test_legacy_attention_names(self):
        legacy = {}
        for k, v in self.sd.items():
            for new, old in (("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")):
                if ".attentions.0." + new in k:
                    k = k.replace(".attentions.0." + new, ".attentions.0." + old)
                    if k.endswith("weight"):
                        v = v.reshape(v.shape[0], v.shape[1], 1, 1)
            legacy[k] = v
        self.assertNotEqual(set(legacy), set(self.sd))
        norm = normalize_state_dict(legacy)
        self.assertEqual(set(norm), set(self.sd))
        for k in norm:
            self.assertTrue(torch.equal(norm[k], self.sd[k]), k)

    def test_sd15_names_and_shapes(self):
        from weights.export import fast_init
        cfg = load_json(SD15)
        with fast_init():
            names = {}
            for m in (VaeEncoder(cfg), VaeDecoder(cfg)):
                names.update({k: list(v.shape) for k, v in m.state_dict().items()})
        self.assertEqual(names, manifest("vae"))
        self.assertEqual(len(names), 248)


if __name__ == "__main__":
    unittest.main()
