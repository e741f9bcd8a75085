"""Importing the package and --help of every command stay light: no runtime, simplifier or GPU stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("onnxruntime", "onnxsim", "onnxslim", "tensorrt", "tensorrt_rtx", "matplotlib", "typer",
         "tritonclient", "grpc", "gevent")

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked for the test: ' + name)
        return None
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_is_light() -> None:
    code = "import sys, slab_deploy; print(sorted(m for m in sys.modules if m.split('.')[0] in {!r}))".format(
        HEAVY + ("torch",))
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_render_and_cli_import_light() -> None:
    """The CLI module and the render module load no torch: `--help` stays fast."""
    code = ("import sys, slab_deploy.render, slab_deploy.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {!r}))").format(
        tuple(h for h in HEAVY if h != "typer") + ("torch",))
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_library_imports_no_optional_modules() -> None:
    code = (
        "import sys; "
        "import slab_deploy.models, slab_deploy.passes, slab_deploy.export.api, slab_deploy.parity; "
        f"import torch; print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})); "
        "print(torch.cuda.is_initialized())"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[]", "False"]


COMMANDS = ["", "models", "inspect", "fold", "export", "build", "check", "recalibrate", "bench", "trace",
            "profiles", "serve-repo", "serve", "serve-bench"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_works_without_extras(cmd: str) -> None:
    blocked = ("onnxruntime", "onnxsim", "onnxslim", "tensorrt", "tensorrt_rtx", "matplotlib", "tritonclient",
               "grpc",
               "gevent", "pytriton")
    code = BLOCKER.format(blocked=blocked) + (
        f"sys.argv = ['slab-deploy'] + {[cmd] if cmd else []!r} + ['--help']\n"
        "from slab_deploy.cli import main\nmain()"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout


def test_missing_dependency_error_names_the_install_line() -> None:
    code = BLOCKER.format(blocked=("onnxruntime",)) + (
        "from slab_deploy._deps import require\n"
        "from slab_deploy.errors import MissingDependencyError\n"
        "try:\n    require('onnxruntime', 'running ONNX models')\n"
        "except MissingDependencyError as e:\n    print(e)\n"
    )
    r = _run(code)
    assert "pip install 'slab-deploy[cpu]'" in r.stdout, r.stdout + r.stderr


def test_simplifier_cannot_pip_install() -> None:
    from slab_deploy._deps import no_pip_install

    with no_pip_install(), pytest.raises(RuntimeError, match="refused a package install"):
        subprocess.check_call([sys.executable, "-m", "pip", "install", "onnxruntime"])
    # outside the block subprocesses work again
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0


def test_serve_package_imports_light() -> None:
    """Writing a repository, starting a server and the load client import tritonclient, onnxruntime
    and torch only when they run."""
    code = ("import sys; import slab_deploy.serve, slab_deploy.serve.server, slab_deploy.serve.load, "
            "slab_deploy.serve.config; print(sorted(m for m in sys.modules if m.split('.')[0] in {!r}))"
            ).format(HEAVY + ("torch", "pytriton"))
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
