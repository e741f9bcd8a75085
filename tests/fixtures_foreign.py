"""Writes tests/data/foreign/: baseline checkpoints as users get them, written by their producers' own code.

- `timm_swin/` and `timm_deit/`: timm's hub files (`model.safetensors`, `pytorch_model.bin`,
  `config.json`) written by `timm.models._hub.save_for_hf` from `timm.create_model(...)`, for
  timm's Swin and DeiT (ViT) built at the size of the zoo's `test_swin` / `test_deit`.
- `ms_swin/ckpt.pth`: a Microsoft Swin release file (`{'model': state_dict}`, with the persistent
  `relative_position_index` and `attn_mask` buffers) from Microsoft's own `SwinTransformer` class.
- `expected.pt`: the inputs and the logits each producer's model gives on them, so the tests can
  prove the zoo computes the same function from the mapped weights.

These producers cannot run where the tests run (timm needs torchvision, and Microsoft's code is
not a package), so the files are committed and this script is how they were made. Run by hand:

    python tests/fixtures_foreign.py --swin-src PATH/TO/Swin-Transformer [--out tests/data/foreign]

with timm (and huggingface_hub) importable. timm imports torchvision at import time and
torchvision is not installed here, so the script re-runs itself in a subprocess with an
import-only `torchvision` stub first on sys.path: the stub provides names for timm's imports and
nothing that runs (timm's Swin and ViT use no torchvision code); the weights and files are
timm's and Microsoft's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SWIN = dict(img_size=64, patch_size=2, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4),
            window_size=4)
DEIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
NUM_CLASSES = 10

_STUB = '''"""Import-only stand-in for torchvision, for tests/fixtures_foreign.py only: every name exists,
none runs."""
import importlib.abc, importlib.machinery, sys, types

class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Meta(name, (), {})

class _Mod(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Meta(name, (), {})

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None
    def create_module(self, spec):
        m = _Mod(spec.name)
        m.__path__ = []
        return m
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, _Finder())
__path__ = []
def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Meta(name, (), {})
'''


def _produce(out: Path, swin_src: Path) -> None:
    import timm
    import torch
    from timm.models._hub import save_for_hf

    sys.path.insert(0, str(HERE.parent))
    from slab_deploy.weights import randomize_weights

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    x_swin = torch.randn(2, 3, SWIN["img_size"], SWIN["img_size"], generator=g)
    x_deit = torch.randn(2, 3, DEIT["img_size"], DEIT["img_size"], generator=g)
    expected: dict[str, object] = {"swin_input": x_swin, "deit_input": x_deit,
                                   "timm_version": timm.__version__}

    for tag, name, arch, x, seed in (
        ("timm_swin", "swin_tiny_patch4_window7_224", SWIN, x_swin, 1),
        ("timm_deit", "deit_tiny_patch16_224", DEIT, x_deit, 2),
    ):
        model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **arch).eval()
        randomize_weights(model, seed, calibrate=False)  # every weight away from its init value
        save_for_hf(model, str(out / tag), safe_serialization="both")
        with torch.no_grad():
            expected[f"{tag}_logits"] = model(x)

    spec = importlib.util.spec_from_file_location("ms_swin", swin_src / "models" / "swin_transformer.py")
    assert spec is not None and spec.loader is not None
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)
    model = ms.SwinTransformer(num_classes=NUM_CLASSES, drop_path_rate=0.0,
                               **{**SWIN, "depths": list(SWIN["depths"])}).eval()
    randomize_weights(model, 3, calibrate=False)
    (out / "ms_swin").mkdir(exist_ok=True)
    torch.save({"model": model.state_dict()}, out / "ms_swin" / "ckpt.pth")
    with torch.no_grad():
        expected["ms_swin_logits"] = model(x_swin)
    torch.save(expected, out / "expected.pt")
    print(f"wrote {out} with timm {timm.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swin-src", type=Path, required=True, help="checkout of microsoft/Swin-Transformer")
    ap.add_argument("--out", type=Path, default=HERE / "data" / "foreign")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _produce(args.out, args.swin_src)
        return
    with tempfile.TemporaryDirectory() as stub:
        (Path(stub) / "torchvision").mkdir()
        (Path(stub) / "torchvision" / "__init__.py").write_text(_STUB)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([stub, os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, __file__, "--child", "--swin-src", str(args.swin_src), "--out", str(args.out)]
        raise SystemExit(subprocess.call(cmd, env=env))


if __name__ == "__main__":
    main()
