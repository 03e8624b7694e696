#!/usr/bin/env python3
"""Export Stable Diffusion 1.5 components to TorchScript for diffusion-features.

See --help (HELP below) for usage. Library use: `export(source, out, ...)`.
"""
import argparse
import contextlib
import inspect
import json
import mmap
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as `python3 weights/export.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from weights.jit_sources import relative_source_names  # noqa: E402

FORMAT_VERSION = 1
ALL_COMPONENTS = ("unet", "vae", "text_encoder", "controlnet")
HERE = os.path.dirname(os.path.abspath(__file__))
SD15_CONFIGS = os.path.join(HERE, "configs", "sd15")
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
DEFAULT_SCALING = 0.18215

DESCRIPTION = """\
Export Stable Diffusion 1.5 components (UNet, VAE, CLIP text encoder, ControlNet) to TorchScript
files for diffusion-features. Works with torch 1.13 and 2.x; everything runs on the CPU.

Sources (--from):
  DIR                 a diffusers-layout folder: unet/, vae/, text_encoder/, optional controlnet/,
                      each with config.json and weights (*.safetensors, a sharded
                      *.safetensors.index.json, or a pickled *.bin -- see below), and tokenizer/
                      with vocab.json + merges.txt; scheduler/scheduler_config.json is used if present.
                      Weights may be float32, float16 or bfloat16.
  FILE.safetensors    an original single-file SD checkpoint (keys model.diffusion_model.*,
                      first_stage_model.*, cond_stage_model.transformer.*, as in
                      v1-5-pruned-emaonly.safetensors). Other entries (EMA, schedule buffers,
                      position ids) are ignored. Needs --tokenizer DIR; --config DIR for models that are
                      not the standard SD1.5 size (the built-in defaults are the real SD1.5 configs).
  FILE.ckpt / .pt / .pth / .bin
                      the same, pickled. Loaded ONLY with torch.load(weights_only=True), which refuses
                      arbitrary code; torch versions without weights_only are refused. Prefer
                      .safetensors.

Output (--out OUT): unet.pt, vae_encoder.pt, vae_decoder.pt, text_encoder.pt, controlnet.pt (those
exported), vocab.json, merges.txt and model.json. OUT is built in a temporary sibling folder and
renamed into place only when everything succeeded, so it is written completely or not at all.
A component missing from the source is skipped with a message (unless named in --components).
A state dict that does not fit the model is an error listing the missing, unexpected and mis-shaped keys.
"""

EPILOG = """\
examples:
  python3 weights/export.py --from models/micro-src --out models/micro --dtype float16
  python3 weights/export.py --from ~/sd15 --out ~/sd15-export --components unet,vae,text_encoder
  python3 weights/export.py --from v1-5-pruned-emaonly.safetensors --tokenizer ~/sd15/tokenizer --out ~/sd15-export
"""


class ExportError(Exception):
    """A problem with the input; the message says what and where."""


def log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# module construction without wasted random initialisation (every parameter is loaded afterwards,
# strictly, so nothing uninitialised survives)

@contextlib.contextmanager
def fast_init():
    names = ["kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_", "trunc_normal_",
             "xavier_uniform_", "xavier_normal_", "orthogonal_"]
    saved = {n: getattr(torch.nn.init, n) for n in names if hasattr(torch.nn.init, n)}

    def noop(tensor, *args, **kwargs):
        return tensor

    try:
        for n in saved:
            setattr(torch.nn.init, n, noop)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


# --------------------------------------------------------------------------------------------
# reading weights

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """Validated, memory-mapped (copy-on-write) safetensors reader: tensors share the file's pages."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ExportError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise ExportError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ExportError(f"{path}: bad safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise ExportError(f"{path}: bad safetensors header (not an object)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None
    base = 8 + n
    out: Dict[str, torch.Tensor] = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            dt = _ST_DTYPES[v["dtype"]]
            shape = [int(s) for s in v["shape"]]
            s, e = (int(x) for x in v["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ExportError(f"{path}: tensor {k!r}: bad header entry {v!r}") from None
        count = 1
        for d in shape:
            count *= d
        itemsize = torch.empty(0, dtype=dt).element_size()
        if s < 0 or e < s or base + e > size or e - s != count * itemsize:
            raise ExportError(f"{path}: tensor {k!r}: data offsets {[s, e]} do not fit shape {shape} "
                              f"{v['dtype']} in a {size}-byte file")
        if count == 0:
            t = torch.empty(shape, dtype=dt)
        else:
            t = torch.frombuffer(mm, dtype=dt, count=count, offset=base + s).reshape(shape)
        out[k] = t
    return out


def _weights_only_load(path: str) -> Dict[str, torch.Tensor]:
    if "weights_only" not in inspect.signature(torch.load).parameters:
        raise ExportError(f"{path}: pickled checkpoints are only read with torch.load(weights_only=True), "
                          f"which torch {torch.__version__} lacks; convert it to .safetensors")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusing a global, corrupt zip, ...
        raise ExportError(f"{path}: cannot be loaded safely with torch.load(weights_only=True): {e}") from None
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ExportError(f"{path}: does not hold a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_weights_file(path: str) -> Dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith((".ckpt", ".pt", ".pth", ".bin")):
        return _weights_only_load(path)
    raise ExportError(f"{path}: unknown weights format (want .safetensors, or .ckpt/.pt/.pth/.bin)")


_WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
    "controlnet": "diffusion_pytorch_model", "text_encoder": "model",
}


def find_weights(folder: str, component: str) -> List[str]:
    """The weight file(s) of a diffusers component folder, in the order diffusers prefers them."""
    stems = [_WEIGHT_NAMES[component], "diffusion_pytorch_model", "model", "pytorch_model"]
    files = set(os.listdir(folder))
    for ext in (".safetensors", ".bin"):
        for stem in stems:
            for variant in ("", ".fp16", ".bf16"):
                name = stem + variant + ext
                if name + ".index.json" in files:
                    with open(os.path.join(folder, name + ".index.json")) as f:
                        wm = json.load(f).get("weight_map", {})
                    shards = sorted(set(wm.values()))
                    if not shards:
                        raise ExportError(f"{folder}/{name}.index.json: empty weight_map")
                    return [os.path.join(folder, s) for s in shards]
                if name in files:
                    return [os.path.join(folder, name)]
    cands = sorted(x for x in files if x.endswith(".safetensors"))
    if len(cands) == 1:
        return [os.path.join(folder, cands[0])]
    if cands:
        raise ExportError(f"{folder}: several weight files ({', '.join(cands)}); expected "
                          f"{_WEIGHT_NAMES[component]}.safetensors")
    raise ExportError(f"{folder}: no weights (*.safetensors or *.bin)")


def read_component_folder(folder: str, component: str) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    paths = find_weights(folder, component)
    sd: Dict[str, torch.Tensor] = {}
    for p in paths:
        part = read_weights_file(p)
        dup = set(part) & set(sd)
        if dup:
            raise ExportError(f"{p}: tensors also in another shard: {', '.join(sorted(dup)[:5])}")
        sd.update(part)
    return sd, paths


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ExportError(f"{path}: invalid JSON: {e}") from None


# --------------------------------------------------------------------------------------------
# building modules

def _fmt_keys(keys: List[str], limit: int = 40) -> str:
    s = ", ".join(keys[:limit])
    return s + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_strict(modules: List[torch.nn.Module], sd: Dict[str, torch.Tensor], what: str, source: str) -> None:
    """Strict load of `sd` into the union of the modules' state dicts (disjoint names), with an error that
    lists missing, unexpected and mis-shaped keys."""
    want: Dict[str, torch.Tensor] = {}
    for m in modules:
        want.update(m.state_dict())
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    misshaped = [f"{k} (file {list(sd[k].shape)}, model {list(want[k].shape)})"
                 for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    nonfloat = [f"{k} ({sd[k].dtype})" for k in want if k in sd and want[k].is_floating_point()
                and not sd[k].is_floating_point()]
    if missing or unexpected or misshaped or nonfloat:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_fmt_keys(unexpected)}")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped: {_fmt_keys(misshaped)}")
        if nonfloat:
            parts.append(f"{len(nonfloat)} not floating point: {_fmt_keys(nonfloat)}")
        raise ExportError(f"{what}: the weights in {source} do not fit the model built from its config "
                          f"({len(want)} tensors expected, {len(sd)} given): " + "; ".join(parts))
    with torch.no_grad():
        for k, t in want.items():
            t.copy_(sd[k])


def _unet(config):
    from weights.unet import UNet2DConditionModel
    return UNet2DConditionModel(config)


def _controlnet(config):
    from weights.controlnet import ControlNetModel
    return ControlNetModel(config)


def build_modules(component: str, config: dict, sd: Dict[str, torch.Tensor], source: str
                  ) -> List[Tuple[str, torch.nn.Module]]:
    """[(file stem, eager module with the weights loaded)] for one component."""
    if component == "vae":
        from weights.vae import VaeDecoder, VaeEncoder, normalize_state_dict
        with fast_init():
            enc, dec = VaeEncoder(config), VaeDecoder(config)
        load_strict([enc, dec], normalize_state_dict(sd), "vae", source)
        return [("vae_encoder", enc), ("vae_decoder", dec)]
    if component == "text_encoder":
        from weights.clip import ClipTextModel, clean_state_dict
        with fast_init():
            m = ClipTextModel(config)
        load_strict([m], clean_state_dict(sd), "text_encoder", source)
        return [("text_encoder", m)]
    ctor: Callable = {"unet": _unet, "controlnet": _controlnet}[component]
    with fast_init():
        m = ctor(config)
    load_strict([m], sd, component, source)
    return [(component, m)]


# --------------------------------------------------------------------------------------------
# sources

class Source:
    """Where configs, weights and the tokenizer come from."""

    def __init__(self, path: str, tokenizer: Optional[str], config_dir: Optional[str]):
        self.path = path
        self.config_dir = config_dir
        self.is_file = os.path.isfile(path)
        if not self.is_file and not os.path.isdir(path):
            raise ExportError(f"--from {path}: no such file or folder")
        self.tokenizer_arg = tokenizer
        self._ldm: Optional[Dict[str, Dict[str, torch.Tensor]]] = None

    # configs: --config DIR/<c>/config.json or DIR/<c>.json, then DIR/<c>/config.json, then SD1.5
    def config_path(self, component: str) -> Optional[str]:
        cands = []
        if self.config_dir:
            cands += [os.path.join(self.config_dir, component, "config.json"),
                      os.path.join(self.config_dir, component + ".json")]
        if not self.is_file:
            cands.append(os.path.join(self.path, component, "config.json"))
        for c in cands:
            if os.path.isfile(c):
                return c
        if self.is_file and component != "controlnet":
            return os.path.join(SD15_CONFIGS, component + ".json")
        return None

    def config(self, component: str) -> Optional[dict]:
        p = self.config_path(component)
        return read_json(p) if p else None

    def scheduler(self) -> dict:
        cands = []
        if self.config_dir:
            cands += [os.path.join(self.config_dir, "scheduler", "scheduler_config.json"),
                      os.path.join(self.config_dir, "scheduler.json")]
        if not self.is_file:
            cands.append(os.path.join(self.path, "scheduler", "scheduler_config.json"))
        for c in cands:
            if os.path.isfile(c):
                return read_json(c)
        return dict(SD15_SCHEDULER)

    def has(self, component: str) -> bool:
        if self.is_file:
            return component != "controlnet" and bool(self._ldm_parts().get(component))
        d = os.path.join(self.path, component)
        return os.path.isfile(os.path.join(d, "config.json"))

    def why_missing(self, component: str) -> str:
        if self.is_file:
            if component == "controlnet":
                return "a single-file SD checkpoint has no ControlNet"
            from weights.ldm import PREFIXES
            return f"no {PREFIXES[component]}* tensors in {self.path}"
        return f"no {os.path.join(self.path, component, 'config.json')}"

    def _ldm_parts(self) -> Dict[str, Dict[str, torch.Tensor]]:
        if self._ldm is None:
            from weights.ldm import convert_ldm_state_dict
            log(f"reading single-file checkpoint {self.path}")
            sd = read_weights_file(self.path)
            unet_cfg, vae_cfg = self.config("unet"), self.config("vae")
            parts, unmapped = convert_ldm_state_dict(sd, unet_cfg, vae_cfg)
            self._ldm = parts
            self._unmapped = unmapped
        return self._ldm

    def weights(self, component: str) -> Tuple[Dict[str, torch.Tensor], str]:
        if self.is_file:
            parts = self._ldm_parts()
            sd = dict(parts[component])
            from weights.ldm import PREFIXES
            bad = [k for k in self._unmapped if k.startswith(PREFIXES[component])]
            if bad:
                raise ExportError(f"{component}: {len(bad)} keys in {self.path} have no place in the model "
                                  f"built from {self.config_path(component)}: {_fmt_keys(bad)}")
            return sd, self.path
        sd, paths = read_component_folder(os.path.join(self.path, component), component)
        return sd, ", ".join(paths)

    def drop(self, component: str) -> None:
        if self._ldm is not None:
            self._ldm[component] = {}

    def tokenizer_dir(self) -> Optional[str]:
        cands = []
        if self.tokenizer_arg:
            cands += [self.tokenizer_arg, os.path.join(self.tokenizer_arg, "tokenizer")]
        elif not self.is_file:
            cands.append(os.path.join(self.path, "tokenizer"))
        for c in cands:
            if os.path.isfile(os.path.join(c, "vocab.json")) and os.path.isfile(os.path.join(c, "merges.txt")):
                return c
        if self.tokenizer_arg:
            raise ExportError(f"--tokenizer {self.tokenizer_arg}: no vocab.json + merges.txt there")
        return None


# --------------------------------------------------------------------------------------------
# export

def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024.0
    return str(n)


def _script_and_save(name: str, module: torch.nn.Module, path: str, dtype: torch.dtype) -> None:
    module = module.eval()
    if dtype != torch.float32:
        module = module.to(dtype)
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        relative_source_names()
        scripted = torch.jit.script(module)
    except Exception as e:
        raise ExportError(f"{name}: torch.jit.script failed: {e}") from e
    torch.jit.save(scripted, path)


def _layers(unet_config: Optional[dict], size: int) -> Dict[str, List[int]]:
    if unet_config is None:
        return {}
    from weights.unet import layer_shapes
    return {k: [int(x) for x in v] for k, v in layer_shapes(unet_config, size).items()}


def export(source: str, out: str, components: Optional[List[str]] = None, tokenizer: Optional[str] = None,
           config_dir: Optional[str] = None, dtype: str = "float32", force: bool = False) -> dict:
    """Exports into `out` atomically; returns model.json's content."""
    t_start = time.time()
    if dtype not in ("float32", "float16"):
        raise ExportError(f"--dtype {dtype}: want float32 or float16")
    tdtype = torch.float32 if dtype == "float32" else torch.float16
    explicit = components is not None
    comps = list(components) if explicit else list(ALL_COMPONENTS)
    for c in comps:
        if c not in ALL_COMPONENTS:
            raise ExportError(f"--components: unknown component {c!r} (known: {', '.join(ALL_COMPONENTS)})")
    comps = [c for c in ALL_COMPONENTS if c in comps]  # canonical order, no duplicates
    if not comps:
        raise ExportError("--components: nothing to export")

    src = Source(source, tokenizer, config_dir)
    out = os.path.abspath(out)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)) and not force:
        raise ExportError(f"--out {out} already exists (pass --force to replace it)")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ExportError(f"--out {out}: parent folder {parent} does not exist")

    todo = []
    for c in comps:
        if src.has(c):
            todo.append(c)
        elif explicit:
            raise ExportError(f"{c}: requested by --components but missing: {src.why_missing(c)}")
        else:
            log(f"{c}: skipped ({src.why_missing(c)})")
    if not todo:
        raise ExportError(f"{source}: none of {', '.join(comps)} found")
    tok_dir = src.tokenizer_dir()
    if tok_dir is None and "text_encoder" in todo:
        where = "--tokenizer DIR" if src.is_file else f"{os.path.join(source, 'tokenizer')} (or --tokenizer DIR)"
        raise ExportError(f"text_encoder: the tokenizer (vocab.json + merges.txt) is needed: pass {where}")

    configs: Dict[str, dict] = {}
    for c in ALL_COMPONENTS:
        cfg = src.config(c) if (c in todo or c == "unet" or c == "vae") else None
        if cfg is not None:
            configs[c] = cfg
    unet_cfg = configs.get("unet")
    default_size = int(unet_cfg.get("sample_size", 64)) * 8 if unet_cfg else 512
    vae_cfg = configs.get("vae") or {}
    scaling = vae_cfg.get("scaling_factor", DEFAULT_SCALING)
    scaling = float(scaling if scaling is not None else DEFAULT_SCALING)

    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    old_handler = None
    try:
        def on_term(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        try:
            old_handler = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread
            old_handler = None
        files: Dict[str, str] = {}
        for c in todo:
            t0 = time.time()
            sd, where = src.weights(c)
            dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values() if v.is_floating_point()})
            log(f"{c}: {len(sd)} tensors ({'/'.join(dtypes) or '-'}) from {where}")
            mods = build_modules(c, configs[c], sd, where)
            del sd
            src.drop(c)
            for stem, m in mods:
                path = os.path.join(tmp, stem + ".pt")
                log(f"{stem}: scripting and saving ({sum(p.numel() for p in m.parameters()):,} parameters, {dtype})")
                _script_and_save(stem, m, path, tdtype)
                files[stem] = stem + ".pt"
                log(f"{stem}: wrote {stem}.pt ({_human(os.path.getsize(path))})")
            del mods
            log(f"{c}: done in {time.time() - t0:.1f} s")
        if tok_dir is not None:
            for f in ("vocab.json", "merges.txt"):
                shutil.copyfile(os.path.join(tok_dir, f), os.path.join(tmp, f))
                files[f.split(".")[0]] = f
            log(f"tokenizer: copied vocab.json + merges.txt from {tok_dir}")
        else:
            log("tokenizer: skipped (no tokenizer/vocab.json + merges.txt)")
        model = {
            "format_version": FORMAT_VERSION,
            "scaling_factor": scaling,
            "default_size": default_size,
            "configs": configs,
            "scheduler": src.scheduler(),
            "torch_version": torch.__version__,
            "dtype": dtype,
            "components": todo,
            "files": files,
            "source_format": "ldm" if src.is_file else "diffusers",
            "layers": _layers(unet_cfg, default_size),
        }
        with open(os.path.join(tmp, "model.json"), "w") as f:
            json.dump(model, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o755)
        if os.path.exists(out):
            if os.path.isdir(out) and not os.listdir(out):
                os.rmdir(out)
            else:  # --force: swap, then delete the old one
                trash = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=parent)
                os.rename(out, os.path.join(trash, "old"))
                os.rename(tmp, out)
                shutil.rmtree(trash, ignore_errors=True)
                tmp = None
        if tmp is not None:
            os.rename(tmp, out)
            tmp = None
        log(f"wrote {out} ({', '.join(sorted(files.values()))}, model.json) in {time.time() - t_start:.1f} s")
        return model
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 weights/export.py", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", required=True, metavar="DIR|FILE",
                    help="diffusers-layout folder, or single-file SD checkpoint (.safetensors; .ckpt only "
                         "via torch.load(weights_only=True))")
    ap.add_argument("--out", required=True, metavar="OUT", help="output folder (must not exist, unless --force)")
    ap.add_argument("--components", metavar="LIST", default=None,
                    help="comma-separated subset of unet,vae,text_encoder,controlnet (default: all found; "
                         "a component named here must exist)")
    ap.add_argument("--tokenizer", metavar="DIR", default=None,
                    help="folder with vocab.json + merges.txt (default: DIR/tokenizer; needed for a single file)")
    ap.add_argument("--config", metavar="DIR", default=None,
                    help="folder with diffusers config.json files (unet/, vae/, text_encoder/, controlnet/; "
                         "scheduler/scheduler_config.json); overrides the source's configs. For a single file "
                         "the default is the standard SD1.5 configs (weights/configs/sd15)")
    ap.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                    help="storage dtype of the exported parameters (default float32; the loader casts anyway)")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists (still atomically)")
    ap.add_argument("--threads", type=int, default=0, metavar="N", help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    comps = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    try:
        export(args.source, args.out, comps, args.tokenizer, args.config, args.dtype, args.force)
    except ExportError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export: interrupted; nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
