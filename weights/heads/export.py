"""Scripts the head templates and writes them to models/heads/ (committed, like models/ops.pt).

    python3 weights/heads/export.py [--out models/heads]

Each file carries `source_sha256` (of weights/heads/{common,<head>}.py) in its extra files, so the test
weights/tests/test_heads.py can tell when a committed template is stale. Writes are atomic.
"""
import argparse
import os
import sys
import tempfile
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from weights.heads import amalgamation, common, pixel_classifier  # noqa: E402

# file name -> (script function, source files)
HEADS: Dict[str, List[object]] = {
    'pixel_classifier.pt': [pixel_classifier.script, ['common.py', 'pixel_classifier.py']],
    'amalgamation.pt': [amalgamation.script, ['common.py', 'amalgamation.py']],
}


def source_sha256(name: str) -> str:
    return common.source_sha256([os.path.join(HERE, f) for f in HEADS[name][1]])  # type: ignore[index]


def _relative_source_names() -> None:
    """TorchScript records each function's source file in the saved debug info: record it relative to the
    repository (weights/heads/common.py), so a template does not embed the exporting machine's paths."""
    import torch._jit_internal
    import torch._sources
    import torch.jit.frontend
    orig = torch._sources.get_source_lines_and_file
    if getattr(orig, '_relative', False):
        return

    def relative(obj, error_msg=None):  # type: ignore[no-untyped-def]
        lines, lineno, filename = orig(obj, error_msg)
        if filename and os.path.isabs(filename) and filename.startswith(ROOT + os.sep):
            filename = os.path.relpath(filename, ROOT)
        return lines, lineno, filename

    relative._relative = True  # type: ignore[attr-defined]
    for mod in (torch._sources, torch._jit_internal, torch.jit.frontend):
        mod.get_source_lines_and_file = relative  # type: ignore[attr-defined]


def save(out_dir: str) -> List[str]:
    _relative_source_names()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, (fn, _) in HEADS.items():
        m = fn()  # type: ignore[operator]
        out = os.path.join(out_dir, name)
        fd, tmp = tempfile.mkstemp(prefix='.head-', suffix='.pt', dir=out_dir)
        os.close(fd)
        try:
            torch.jit.save(m, tmp, _extra_files={'source_sha256': source_sha256(name), 'torch_version': torch.__version__})
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        written.append(out)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description='Script the GATE head templates (weights/heads) to TorchScript')
    ap.add_argument('--out', default=os.path.join(ROOT, 'models', 'heads'))
    a = ap.parse_args()
    for p in save(a.out):
        print('wrote ' + p)


if __name__ == '__main__':
    main()
