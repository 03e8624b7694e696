"""Single-file LDM checkpoints: the key map vs diffusers 0.27.2's (key_map_sd15.tsv), and the export of a
micro LDM file giving bit-identical modules to the export of the diffusers-layout micro set."""
import gzip
import os
import shutil
import tempfile
import unittest

import torch

from weights.export import fast_init, read_safetensors
from weights.ldm import PREFIXES, LdmKeyMap, convert_ldm_state_dict, is_vae_attn_weight, to_ldm_state_dict
from weights.st import save
from weights.tests.test_export import MICRO, PT_FILES, assert_bitwise_equal, jit_state, run_export, siblings
from weights.tests.test_vae import KEYMAP, ROOT, load_json

SD15 = os.path.join(ROOT, "weights", "configs", "sd15")
MICRO_FILES = {"unet": "unet/diffusion_pytorch_model.safetensors",
               "vae": "vae/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors"}
# the micro model lacks these SD1.5 shortcuts (equal channel counts there)
MICRO_ABSENT = {"model.diffusion_model.input_blocks.7.0.skip_connection.weight",
                "model.diffusion_model.input_blocks.7.0.skip_connection.bias",
                "first_stage_model.encoder.down.2.block.0.nin_shortcut.weight",
                "first_stage_model.encoder.down.2.block.0.nin_shortcut.bias",
                "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
                "first_stage_model.decoder.up.1.block.0.nin_shortcut.bias"}


def read_tsv():
    rows = []
    with gzip.open(KEYMAP, "rt") as f:
        for line in f:
            if not line.startswith("#"):
                rows.append(line.rstrip("\n").split("\t"))
    return rows


def shape(s):
    return [] if s == "scalar" else [int(x) for x in s.split(",")]


def cfg(d, c):
    return load_json(os.path.join(d, c + ".json") if d == SD15 else os.path.join(d, c, "config.json"))


def non_weight_entries():
    """What real SD1.x files carry besides the weights (four dtypes, 0-dim tensors)."""
    b = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - b, 0)
    return {"betas": b.float(), "alphas_cumprod": ac.float(), "sqrt_alphas_cumprod": ac.sqrt().float(),
            "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
            "logvar": torch.zeros(1000)}


def micro_components():
    return {c: read_safetensors(os.path.join(MICRO, f)) for c, f in MICRO_FILES.items()}


class TestKeyMapSd15(unittest.TestCase):
    def setUp(self):
        self.rows = read_tsv()
        self.map = LdmKeyMap(cfg(SD15, "unet"), cfg(SD15, "vae"))

    def test_all_1130_weights_both_directions(self):
        weights = [r for r in self.rows if r[1] != "-"]
        self.assertEqual(len(weights), 1130)
        counts = {}
        for ldm, dk, ls, ds, note in weights:
            comp = next(c for c, p in PREFIXES.items() if ldm.startswith(p))
            counts[comp] = counts.get(comp, 0) + 1
            self.assertEqual(self.map.to_diffusers(ldm), (comp, dk), ldm)
            self.assertEqual(self.map.to_ldm(comp, dk), ldm, dk)
            reshaped = comp == "vae" and is_vae_attn_weight(dk)
            self.assertEqual(reshaped, bool(note), ldm)
            self.assertEqual(shape(ds), shape(ls)[:2] if reshaped else shape(ls), ldm)
        self.assertEqual(counts, {"unet": 686, "vae": 248, "text_encoder": 196})
        self.assertEqual(sum(1 for r in weights if r[4]), 8)

    def test_non_weights_ignored(self):
        rest = [r for r in self.rows if r[1] == "-"]
        self.assertEqual(len(rest), 15)
        fake = {r[0]: torch.zeros(shape(r[2])) for r in rest}
        parts, unmapped = convert_ldm_state_dict(fake, cfg(SD15, "unet"), cfg(SD15, "vae"))
        self.assertEqual(unmapped, [])
        self.assertEqual(parts["unet"], {})
        self.assertEqual(parts["vae"], {})
        self.assertEqual(list(parts["text_encoder"]), ["text_model.embeddings.position_ids"])  # dropped by clip

    def test_full_size_modules_take_the_converted_names_and_shapes(self):
        from weights.clip import ClipTextModel
        from weights.unet import UNet2DConditionModel
        from weights.vae import VaeDecoder, VaeEncoder
        fake = {r[0]: torch.empty(shape(r[2]), dtype=torch.float16) for r in self.rows if r[1] != "-"}
        parts, unmapped = convert_ldm_state_dict(fake, cfg(SD15, "unet"), cfg(SD15, "vae"))
        self.assertEqual(unmapped, [])
        with fast_init():
            mods = {"unet": [UNet2DConditionModel(cfg(SD15, "unet"))],
                    "vae": [VaeEncoder(cfg(SD15, "vae")), VaeDecoder(cfg(SD15, "vae"))],
                    "text_encoder": [ClipTextModel(cfg(SD15, "text_encoder"))]}
        for comp, ms in mods.items():
            want = {}
            for m in ms:
                want.update({k: list(v.shape) for k, v in m.state_dict().items()})
            got = {k: list(v.shape) for k, v in parts[comp].items()}
            self.assertEqual(got, want, comp)


class TestMicroLdm(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(min(2, torch.get_num_threads()))
        cls.tmp = tempfile.mkdtemp(prefix="ldm-test-")
        comps = micro_components()
        cls.ldm = to_ldm_state_dict(comps, cfg(MICRO, "unet"), cfg(MICRO, "vae"))
        sd = dict(cls.ldm)
        sd.update(non_weight_entries())
        cls.file = os.path.join(cls.tmp, "micro_ldm.safetensors")
        save(cls.file, sd, {"format": "pt"})
        cls.ref = os.path.join(cls.tmp, "ref")
        rc, log = run_export("--from", MICRO, "--out", cls.ref)
        assert rc == 0, log

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_generated_file_has_the_sd15_layout(self):
        tsv = {r[0]: r for r in read_tsv() if r[1] != "-"}
        # ... and has 2 text-encoder layers instead of 12
        deep = {k for k in tsv if k.startswith(PREFIXES["text_encoder"] + "text_model.encoder.layers.")
                and int(k.split(".")[5]) >= 2}
        self.assertEqual(len(deep), 160)
        self.assertEqual(set(tsv) - set(self.ldm), MICRO_ABSENT | deep)
        self.assertTrue(set(self.ldm) <= set(tsv))
        self.assertEqual(len(self.ldm), 684 + 244 + 36)
        for k, v in self.ldm.items():
            self.assertEqual(len(v.shape), len(shape(tsv[k][2])), k)  # (C,C,1,1) attention weights too

    def test_roundtrip(self):
        parts, unmapped = convert_ldm_state_dict(self.ldm, cfg(MICRO, "unet"), cfg(MICRO, "vae"))
        self.assertEqual(unmapped, [])
        for c, sd in micro_components().items():
            assert_bitwise_equal(self, dict(sorted(parts[c].items())), dict(sorted(sd.items())), c)

    def test_export_equals_diffusers_export(self):
        out = os.path.join(self.tmp, "from-ldm")
        rc, log = run_export("--from", self.file, "--out", out, "--config", MICRO,
                             "--tokenizer", os.path.join(MICRO, "tokenizer"))
        self.assertEqual(rc, 0, log)
        self.assertIn("controlnet: skipped", log)
        names = [f for f in PT_FILES if f != "controlnet.pt"]
        self.assertEqual(sorted(os.listdir(out)), sorted(names + ["vocab.json", "merges.txt", "model.json"]))
        for f in names:
            assert_bitwise_equal(self, jit_state(os.path.join(out, f)), jit_state(os.path.join(self.ref, f)), f)
        a, b = load_json(os.path.join(out, "model.json")), load_json(os.path.join(self.ref, "model.json"))
        self.assertEqual(a["source_format"], "ldm")
        for k in ("format_version", "scaling_factor", "default_size", "scheduler", "layers", "dtype"):
            self.assertEqual(a[k], b[k], k)
        for c in ("unet", "vae", "text_encoder"):
            self.assertEqual(a["configs"][c], b["configs"][c], c)
        self.assertEqual(a["components"], ["unet", "vae", "text_encoder"])

    def test_ckpt_weights_only(self):
        ckpt = os.path.join(self.tmp, "micro.ckpt")
        sd = dict(self.ldm)
        sd.update(non_weight_entries())
        torch.save({"state_dict": sd, "global_step": 470000, "epoch": 3}, ckpt)
        out = os.path.join(self.tmp, "from-ckpt")
        rc, log = run_export("--from", ckpt, "--out", out, "--config", MICRO, "--components", "vae,text_encoder",
                             "--tokenizer", MICRO)  # DIR/tokenizer is found too
        self.assertEqual(rc, 0, log)
        for f in ("vae_encoder.pt", "vae_decoder.pt", "text_encoder.pt"):
            assert_bitwise_equal(self, jit_state(os.path.join(out, f)), jit_state(os.path.join(self.ref, f)), f)
        # a pickle that is more than tensors is refused by weights_only
        bad = os.path.join(self.tmp, "evil.ckpt")
        torch.save({"state_dict": sd, "obj": unittest.TestCase}, bad)
        rc, log = run_export("--from", bad, "--out", os.path.join(self.tmp, "evil"), "--config", MICRO,
                             "--components", "vae")
        self.assertEqual(rc, 2)
        self.assertIn("weights_only=True", log)

    def test_wrong_size_config_lists_keys(self):
        out = os.path.join(self.tmp, "default-cfg")
        rc, log = run_export("--from", self.file, "--out", out, "--components", "vae")  # SD1.5 configs
        self.assertEqual(rc, 2)
        self.assertIn("mis-shaped: encoder.conv_in.weight (file [16, 3, 3, 3], model [128, 3, 3, 3])", log)
        self.assertIn("missing: encoder.down_blocks.2.resnets.0.conv_shortcut.weight", log)
        self.assertEqual(siblings(out), [])

    def test_unmapped_key_is_an_error(self):
        sd = dict(self.ldm)
        sd["first_stage_model.encoder.down.9.block.0.conv1.weight"] = torch.zeros(1)
        f = os.path.join(self.tmp, "extra.safetensors")
        save(f, sd)
        rc, log = run_export("--from", f, "--out", os.path.join(self.tmp, "extra"), "--config", MICRO,
                             "--components", "vae")
        self.assertEqual(rc, 2)
        self.assertIn("first_stage_model.encoder.down.9.block.0.conv1.weight", log)

    def test_tokenizer_required(self):
        rc, log = run_export("--from", self.file, "--out", os.path.join(self.tmp, "notok"), "--config", MICRO,
                             "--components", "text_encoder")
        self.assertEqual(rc, 2)
        self.assertIn("--tokenizer DIR", log)


if __name__ == "__main__":
    unittest.main()
