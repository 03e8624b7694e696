"""weights/export.py: export the bundled micro model and check every file against the reference goldens."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import torch

from weights import export as ex
from weights.st import load, relerr, save
from weights.tests.test_vae import ROOT, TOL, load_json

MICRO = os.path.join(ROOT, "models", "micro-src")
GOLD = os.path.join(ROOT, "test", "fixtures", "micro", "goldens")
PT_FILES = ["unet.pt", "controlnet.pt", "vae_encoder.pt", "vae_decoder.pt", "text_encoder.pt"]


def run_export(*args, **kw):
    """Runs the CLI in-process; returns (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = ex.main([str(a) for a in args])
    return rc, err.getvalue()


def jit_state(path):
    return {k: v for k, v in torch.jit.load(path).state_dict().items()}


def assert_bitwise_equal(tc, a, b, what):
    tc.assertEqual(list(a), list(b), what + ": names/order")
    for k in a:
        tc.assertEqual(a[k].dtype, b[k].dtype, f"{what}: {k} dtype")
        tc.assertEqual(a[k].shape, b[k].shape, f"{what}: {k} shape")
        tc.assertTrue(torch.equal(a[k], b[k]), f"{what}: {k} differs")


def siblings(out):
    base = os.path.basename(out)
    return [n for n in os.listdir(os.path.dirname(out)) if n.startswith(base)]


def make_source(tmp, components, tokenizer=True):
    """A diffusers-layout folder with only some of the micro components (symlinked)."""
    d = os.path.join(tmp, "src-" + "-".join(components))
    os.makedirs(d)
    for c in list(components) + (["tokenizer"] if tokenizer else []) + ["scheduler"]:
        os.symlink(os.path.join(MICRO, c), os.path.join(d, c))
    return d


class TestExportMicro(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.set_num_threads(min(2, torch.get_num_threads()))
        cls.tmp = tempfile.mkdtemp(prefix="export-test-")
        cls.out = os.path.join(cls.tmp, "micro")
        rc, cls.log = run_export("--from", MICRO, "--out", cls.out)
        assert rc == 0, cls.log
        cls.model = load_json(os.path.join(cls.out, "model.json"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def test_files(self):
        self.assertEqual(sorted(os.listdir(self.out)),
                         sorted(PT_FILES + ["vocab.json", "merges.txt", "model.json"]))
        for f in ("vocab.json", "merges.txt"):
            with open(os.path.join(self.out, f), "rb") as a, open(os.path.join(MICRO, "tokenizer", f), "rb") as b:
                self.assertEqual(a.read(), b.read(), f)
        self.assertEqual(siblings(self.out), ["micro"])  # no temp folder left behind
        self.assertIn("[export]", self.log)

    def test_model_json(self):
        m = self.model
        self.assertEqual(m["format_version"], 1)
        self.assertEqual(m["scaling_factor"], 0.18215)
        self.assertEqual(m["default_size"], 128)  # micro unet sample_size 16 * 8
        self.assertEqual(m["dtype"], "float32")
        self.assertEqual(m["torch_version"], torch.__version__)
        self.assertEqual(m["components"], ["unet", "vae", "text_encoder", "controlnet"])
        self.assertEqual(m["source_format"], "diffusers")
        self.assertEqual(m["files"], {"unet": "unet.pt", "vae_encoder": "vae_encoder.pt",
                                      "vae_decoder": "vae_decoder.pt", "text_encoder": "text_encoder.pt",
                                      "controlnet": "controlnet.pt", "vocab": "vocab.json",
                                      "merges": "merges.txt"})
        for c in ("unet", "vae", "text_encoder", "controlnet"):
            self.assertEqual(m["configs"][c], load_json(os.path.join(MICRO, c, "config.json")), c)
        self.assertEqual(m["scheduler"], load_json(os.path.join(MICRO, "scheduler", "scheduler_config.json")))
        from weights.unet import layer_shapes
        want = layer_shapes(m["configs"]["unet"], 128)
        self.assertEqual(list(m["layers"].items()), [(k, list(v)) for k, v in want.items()])  # forward order
        self.assertEqual(len(m["layers"]), 197)
        self.assertEqual(m["layers"]["unet-out"], [4, 16, 16])

    def test_unet_and_controlnet_vs_goldens(self):
        g, _ = load(os.path.join(GOLD, "unet.safetensors"))
        unet = torch.jit.load(os.path.join(self.out, "unet.pt"))
        ids = [k for k in g if not k.startswith(("in.", "out."))]
        self.assertGreater(len(ids), 150)
        with torch.no_grad():
            out = unet(g["in.sample"], g["in.timestep"], g["in.encoder_hidden_states"], ids, None, None)
        worst = 0.0
        for k in ids:
            e = relerr(out[k], g[k])
            worst = max(worst, e)
            self.assertLessEqual(e, TOL, f"unet {k}: rel err {e:.3e}")
        e = relerr(out["out"], g["out.sample"])
        self.assertLessEqual(e, TOL, f"unet out: rel err {e:.3e}")

        g, _ = load(os.path.join(GOLD, "controlnet.safetensors"))
        cn = torch.jit.load(os.path.join(self.out, "controlnet.pt"))
        with torch.no_grad():
            res = cn(g["in.sample"], g["in.timestep"], g["in.encoder_hidden_states"], g["in.controlnet_cond"], 1.0)
        self.assertEqual(len(res), 13)
        for i in range(12):
            e = relerr(res[i], g[f"out.down_block_res_samples.{i}"])
            self.assertLessEqual(e, TOL, f"controlnet down {i}: rel err {e:.3e}")
        e = relerr(res[12], g["out.mid_block_res_sample"])
        self.assertLessEqual(e, TOL, f"controlnet mid: rel err {e:.3e}")
        wid = [k[len("unet_with_controlnet."):] for k in g if k.startswith("unet_with_controlnet.")]
        with torch.no_grad():
            o2 = unet(g["in.sample"], g["in.timestep"], g["in.encoder_hidden_states"],
                      [k for k in wid if k != "out.sample"], list(res[:12]), res[12])
        for k in wid:
            e = relerr(o2["out" if k == "out.sample" else k], g["unet_with_controlnet." + k])
            self.assertLessEqual(e, TOL, f"unet+controlnet {k}: rel err {e:.3e}")

    def test_vae_and_text_vs_goldens(self):
        g, _ = load(os.path.join(GOLD, "vae.safetensors"))
        enc = torch.jit.load(os.path.join(self.out, "vae_encoder.pt"))
        dec = torch.jit.load(os.path.join(self.out, "vae_decoder.pt"))
        with torch.no_grad():
            mean, logvar = enc(g["in.image"])
            image = dec(g["in.decoder_latent"])
        for name, a, b in (("mean", mean, g["out.latent_dist.mean"]), ("logvar", logvar, g["out.latent_dist.logvar"]),
                           ("decoded", image, g["out.decoded"])):
            e = relerr(a, b)
            self.assertLessEqual(e, TOL, f"vae {name}: rel err {e:.3e}")
        g, _ = load(os.path.join(GOLD, "text_encoder.safetensors"))
        te = torch.jit.load(os.path.join(self.out, "text_encoder.pt"))
        with torch.no_grad():
            e = relerr(te(g["in.input_ids"]), g["out.last_hidden_state"])
        self.assertLessEqual(e, TOL, f"text_encoder: rel err {e:.3e}")

    def test_float32_cpu(self):
        for f in PT_FILES:
            for k, v in jit_state(os.path.join(self.out, f)).items():
                if v.is_floating_point():
                    self.assertEqual(v.dtype, torch.float32, f"{f}: {k}")
                self.assertEqual(v.device.type, "cpu")

    def test_float16_roundtrip_exact(self):
        out16 = os.path.join(self.tmp, "micro16")
        rc, log = run_export("--from", MICRO, "--out", out16, "--dtype", "float16")
        self.assertEqual(rc, 0, log)
        self.assertEqual(load_json(os.path.join(out16, "model.json"))["dtype"], "float16")
        for f in PT_FILES:
            a, b = jit_state(os.path.join(out16, f)), jit_state(os.path.join(self.out, f))
            for k in b:
                if b[k].is_floating_point():
                    self.assertEqual(a[k].dtype, torch.float16, f"{f}: {k}")
            assert_bitwise_equal(self, {k: v.float() if v.is_floating_point() else v for k, v in a.items()},
                                 b, f + " (float16 -> float32)")

    def test_components_subset(self):
        out = os.path.join(self.tmp, "vae-only")
        rc, log = run_export("--from", MICRO, "--out", out, "--components", "vae")
        self.assertEqual(rc, 0, log)
        self.assertEqual(sorted(os.listdir(out)), ["merges.txt", "model.json", "vae_decoder.pt", "vae_encoder.pt",
                                                   "vocab.json"])
        m = load_json(os.path.join(out, "model.json"))
        self.assertEqual(m["components"], ["vae"])
        self.assertEqual(len(m["layers"]), 197)  # the unet config is still there to describe the layers
        assert_bitwise_equal(self, jit_state(os.path.join(out, "vae_encoder.pt")),
                             jit_state(os.path.join(self.out, "vae_encoder.pt")), "vae_encoder")
        rc, log = run_export("--from", MICRO, "--out", os.path.join(self.tmp, "x"), "--components", "vae,bogus")
        self.assertEqual(rc, 2)
        self.assertIn("unknown component 'bogus'", log)

    def test_missing_component_skipped(self):
        src = make_source(self.tmp, ["vae", "text_encoder"])
        out = os.path.join(self.tmp, "no-unet")
        rc, log = run_export("--from", src, "--out", out)
        self.assertEqual(rc, 0, log)
        self.assertIn("unet: skipped", log)
        self.assertIn("controlnet: skipped", log)
        self.assertEqual(load_json(os.path.join(out, "model.json"))["components"], ["vae", "text_encoder"])
        self.assertFalse(os.path.exists(os.path.join(out, "unet.pt")))
        # asked for explicitly: an error, nothing written
        out2 = os.path.join(self.tmp, "no-unet-2")
        rc, log = run_export("--from", src, "--out", out2, "--components", "unet,vae")
        self.assertEqual(rc, 2)
        self.assertIn("unet: requested by --components but missing", log)
        self.assertEqual(siblings(out2), [])

    def test_missing_tokenizer(self):
        src = make_source(self.tmp, ["text_encoder"], tokenizer=False)
        out = os.path.join(self.tmp, "no-tok")
        rc, log = run_export("--from", src, "--out", out)
        self.assertEqual(rc, 2)
        self.assertIn("tokenizer (vocab.json + merges.txt) is needed", log)
        self.assertEqual(siblings(out), [])

    def test_bad_state_dict_lists_keys_and_writes_nothing(self):
        src = os.path.join(self.tmp, "bad-src")
        os.makedirs(src)
        for c in ("unet", "text_encoder", "tokenizer", "scheduler"):
            os.symlink(os.path.join(MICRO, c), os.path.join(src, c))
        os.makedirs(os.path.join(src, "vae"))
        shutil.copy(os.path.join(MICRO, "vae", "config.json"), os.path.join(src, "vae"))
        sd, _ = load(os.path.join(MICRO, "vae", "diffusion_pytorch_model.safetensors"))
        del sd["decoder.conv_out.bias"]
        sd["decoder.conv_out.extra"] = torch.zeros(3, dtype=torch.float16)
        sd["encoder.conv_in.weight"] = torch.zeros(16, 3, 5, 5, dtype=torch.float16)
        save(os.path.join(src, "vae", "diffusion_pytorch_model.safetensors"), sd)
        out = os.path.join(self.tmp, "bad-out")
        rc, log = run_export("--from", src, "--out", out)  # unet is exported first, then vae fails
        self.assertEqual(rc, 2)
        self.assertIn("unet.pt", log)
        self.assertIn("missing: decoder.conv_out.bias", log)
        self.assertIn("unexpected: decoder.conv_out.extra", log)
        self.assertIn("mis-shaped: encoder.conv_in.weight (file [16, 3, 5, 5], model [16, 3, 3, 3])", log)
        self.assertEqual(siblings(out), [])  # atomic: neither OUT nor OUT.tmp-*

    def test_sharded_and_bfloat16_sources(self):
        src = os.path.join(self.tmp, "sharded-src")
        os.makedirs(os.path.join(src, "text_encoder"))
        os.makedirs(os.path.join(src, "vae"))
        os.symlink(os.path.join(MICRO, "tokenizer"), os.path.join(src, "tokenizer"))
        shutil.copy(os.path.join(MICRO, "text_encoder", "config.json"), os.path.join(src, "text_encoder"))
        sd, _ = load(os.path.join(MICRO, "text_encoder", "model.safetensors"))
        keys = sorted(sd)
        wm = {}
        for i, part in enumerate((keys[:10], keys[10:])):
            name = f"model-0000{i + 1}-of-00002.safetensors"
            save(os.path.join(src, "text_encoder", name), {k: sd[k] for k in part})
            wm.update({k: name for k in part})
        with open(os.path.join(src, "text_encoder", "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wm}, f)
        shutil.copy(os.path.join(MICRO, "vae", "config.json"), os.path.join(src, "vae"))
        vsd, _ = load(os.path.join(MICRO, "vae", "diffusion_pytorch_model.safetensors"))
        save(os.path.join(src, "vae", "diffusion_pytorch_model.safetensors"),
             {k: v.to(torch.bfloat16) for k, v in vsd.items()})
        out = os.path.join(self.tmp, "sharded-out")
        rc, log = run_export("--from", src, "--out", out)
        self.assertEqual(rc, 0, log)
        self.assertIn("model-00002-of-00002.safetensors", log)
        assert_bitwise_equal(self, jit_state(os.path.join(out, "text_encoder.pt")),
                             jit_state(os.path.join(self.out, "text_encoder.pt")), "text_encoder (sharded)")
        got = jit_state(os.path.join(out, "vae_decoder.pt"))
        for k, v in got.items():
            self.assertTrue(torch.equal(v, vsd[k].to(torch.bfloat16).float()), k)

    def test_existing_out(self):
        out = os.path.join(self.tmp, "exists")
        os.makedirs(out)
        with open(os.path.join(out, "keep.txt"), "w") as f:
            f.write("x")
        rc, log = run_export("--from", MICRO, "--out", out, "--components", "text_encoder")
        self.assertEqual(rc, 2)
        self.assertIn("already exists", log)
        self.assertEqual(os.listdir(out), ["keep.txt"])
        rc, log = run_export("--from", MICRO, "--out", out, "--components", "text_encoder", "--force")
        self.assertEqual(rc, 0, log)
        self.assertEqual(sorted(os.listdir(out)), ["merges.txt", "model.json", "text_encoder.pt", "vocab.json"])
        self.assertEqual(siblings(out), ["exists"])

    def test_help(self):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "weights", "export.py"), "--help"],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        for s in ("--from", "--out", "--components", "--tokenizer", "--config", "--dtype", "weights_only=True",
                  "single-file", "model.json"):
            self.assertIn(s, r.stdout)


if __name__ == "__main__":
    unittest.main()
