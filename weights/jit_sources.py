"""TorchScript records each scripted function's source file in the saved debug info. Record it relative to
the repository (weights/unet.py) instead, so an exported file does not embed the exporting machine's paths
and the committed exports (models/micro, models/heads) are byte-reproducible from any checkout."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relative_source_names() -> None:
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
