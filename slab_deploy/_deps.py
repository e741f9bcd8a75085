"""The one gateway to heavy optional modules.

Never import onnxruntime, onnxsim, onnxslim, tensorrt or matplotlib at module level:
call `require(name)` inside the function that needs it. A missing module raises
`MissingDependencyError` with the exact install line.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from slab_deploy.errors import MissingDependencyError

# import name -> (pip requirement that provides it, extra of slab-deploy)
_INSTALL: dict[str, tuple[str, str]] = {
    "onnxruntime": ("onnxruntime (CPU) or onnxruntime-gpu (CUDA)", "cpu"),
    "onnxsim": ("onnxsim", "simplify"),
    "onnxslim": ("onnxslim", "simplify"),
    "tensorrt": ("tensorrt", "tensorrt"),
    "tensorrt_rtx": ("tensorrt-rtx", "tensorrt"),
    "tensorrt_rtx_bindings": ("tensorrt-rtx", "tensorrt"),
    "matplotlib": ("matplotlib", "plot"),
    "safetensors": ("safetensors", "safetensors"),
    "onnxscript": ("onnxscript", "dev"),
    "PIL": ("pillow", "images"),
}


def require(name: str, purpose: str | None = None) -> ModuleType:
    """Import and return optional module `name`, or raise a MissingDependencyError."""
    try:
        if name in ("onnxsim", "onnxslim"):
            with no_pip_install():
                return importlib.import_module(name)
        return importlib.import_module(name)
    except ImportError as exc:
        req, extra = _INSTALL.get(name.split(".")[0], (name, ""))
        why = f" (needed for {purpose})" if purpose else ""
        hint = f"pip install 'slab-deploy[{extra}]'" if extra else f"pip install {req}"
        raise MissingDependencyError(
            f"{name} is not installed{why}: install {req}, e.g. `{hint}` ({exc.__class__.__name__}: {exc})"
        ) from None


def available(name: str) -> bool:
    """True when `name` can be imported, without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _mentions_pip(args: Any) -> bool:
    text = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
    return "pip" in text.split() or " -m pip" in text or "pip install" in text or "pip3" in text


@contextlib.contextmanager
def no_pip_install() -> Iterator[None]:
    """Refuse any attempt to pip-install packages while the block runs.

    Some simplifier releases run `pip install onnxruntime` when they are imported or
    used without one; on a host with onnxruntime-gpu that breaks the install. Inside
    this block such a call raises instead.
    """
    original_system = os.system
    original_init = subprocess.Popen.__init__

    def check(cmd: Any) -> None:
        if _mentions_pip(cmd):
            raise RuntimeError(
                "slab-deploy refused a package install attempted by a third-party module: "
                f"{cmd!r}. Install what you need yourself (see `pip install 'slab-deploy[cpu]'`)."
            )

    def system(command: Any) -> int:  # same parameter name as os.system
        check(command)
        return original_system(command)

    def popen_init(self: Any, args: Any, *rest: Any, **kwargs: Any) -> None:
        check(args)
        original_init(self, args, *rest, **kwargs)

    os.system = system
    subprocess.Popen.__init__ = popen_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        os.system = original_system
        subprocess.Popen.__init__ = original_init  # type: ignore[method-assign]


def module_version(module: str) -> str | None:
    """`__version__` of the module that `import module` loads, or None when it is not installed.

    Prefer this to distribution metadata where two distributions provide one module (onnxruntime
    and onnxruntime-gpu): the metadata may name the one that is not imported."""
    if not available(module):
        return None
    return str(getattr(require(module), "__version__", None) or version_of(module))


def version_of(dist: str) -> str | None:
    """Installed version of distribution `dist`, or None."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
