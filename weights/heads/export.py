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
from weights.jit_sources import relative_source_names  # noqa: E402

# file name -> (script function, source files)
HEADS: Dict[str, List[object]] = {
    'pixel_classifier.pt': [pixel_classifier.script, ['common.py', 'pixel_classifier.py']],
    'amalgamation.pt': [amalgamation.script, ['common.py', 'amalgamation.py']],
}


def source_sha256(name: str) -> str:
    return common.source_sha256([os.path.join(HERE, f) for f in HEADS[name][1]])  # type: ignore[index]


def save(out_dir: str) -> List[str]:
    relative_source_names()
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
