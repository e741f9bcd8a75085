"""Start and stop a real Triton Inference Server on loopback: `TritonServer`.

The server is `tritonserver` from the NGC container (on PATH, or `--tritonserver`), or the one
the nvidia-pytriton wheel bundles, which carries the Python backend only. For the wheel's server
a private backend folder is laid out in a temporary workspace: links to its Python backend and
the backend stub built for the running Python, so the installed package is never modified. The
stub embeds Python and finds its packages from the first `python3` on PATH, so the folder of
the running interpreter goes first on PATH (its site-packages: numpy, onnxruntime) and its
libpython first on LD_LIBRARY_PATH.

The server listens on 127.0.0.1 only. It runs in its own process group and is told to die with
its parent (Linux), so it never outlives the command that started it; `stop()` sends SIGTERM,
waits for Triton's own shutdown, and kills the group only past the grace period.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slab_deploy.errors import ConfigError, MissingDependencyError, SlabDeployError
from slab_deploy.serve.deps import SERVE_INSTALL

HOST = "127.0.0.1"
ENV_BINARY = "SLAB_DEPLOY_TRITONSERVER"
READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 20.0
EXIT_TIMEOUT_S = 10  # Triton's own wait for in-flight requests on SIGTERM (--exit-timeout-secs)
LOG_TAIL_LINES = 6


class ServerError(SlabDeployError):
    """The Triton server could not start, or stopped on its own (exit code 1)."""


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver binary and the backend folder it loads backends from."""

    binary: Path
    backends: Path
    libs: Path | None = None  # the wheel's bundled libraries (nvidia_pytriton.libs)
    stub: Path | None = None  # the wheel's Python-backend stub for this Python (not yet in `backends`)

    @property
    def available_backends(self) -> list[str]:
        return sorted(p.name for p in self.backends.iterdir() if p.is_dir()) if self.backends.is_dir() else []


def _wheel_install() -> TritonInstall | None:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise MissingDependencyError(
            f"nvidia-pytriton ships no Python-backend stub for Python {version}; run "
            "slab-deploy with a Python it supports (3.8-3.13)"
        )
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(binary, root / "backends", libs if libs.is_dir() else None, stub)


def find_tritonserver(binary: str | Path | None = None) -> TritonInstall:
    """The server to run: `binary` (or $SLAB_DEPLOY_TRITONSERVER) with its `../backends`, the
    nvidia-pytriton wheel's bundle, or `tritonserver` on PATH (the NGC container's)."""
    explicit = binary or os.environ.get(ENV_BINARY)
    if explicit:
        path = Path(explicit)
        if not path.is_file() or not os.access(path, os.X_OK):
            raise ConfigError(
                f"--tritonserver {path} is not an executable file; pass the tritonserver binary"
            )
        return TritonInstall(path, path.resolve().parent.parent / "backends")
    found = _wheel_install()
    if found is not None:
        return found
    on_path = shutil.which("tritonserver")
    if on_path:
        path = Path(on_path)
        return TritonInstall(path, path.resolve().parent.parent / "backends")
    raise MissingDependencyError(
        "no Triton server found: install nvidia-pytriton (its wheel bundles tritonserver "
        f"with the Python backend), e.g. `{SERVE_INSTALL}`, run inside the NGC Triton "
        "container, or pass --tritonserver PATH"
    )


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports on 127.0.0.1 that nothing listens on now (all held open while picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TritonServer:
    """One tritonserver process serving `repo` on 127.0.0.1 (ports: 0 picks a free one)."""

    def __init__(
        self,
        repo: str | Path,
        *,
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        install: TritonInstall | None = None,
        log_path: str | Path | None = None,
        exit_timeout_s: int = EXIT_TIMEOUT_S,
        verbose: bool = False,
    ) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise ConfigError(
                f"{repo} is not a directory; pass a model repository written by `slab-deploy serve-repo`"
            )
        for flag, port in (
            ("--http-port", http_port),
            ("--grpc-port", grpc_port),
            ("--metrics-port", metrics_port),
        ):
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise ConfigError(f"{flag} must be a port from 1 to 65535 (0: a free one), not {port!r}")
        self.install = install or find_tritonserver()
        spare = iter(free_ports(3))
        self.ports = {
            "http": http_port or next(spare),
            "grpc": grpc_port or next(spare),
            "metrics": metrics_port or next(spare),
        }
        self.exit_timeout_s = exit_timeout_s
        self.verbose = verbose
        self.workspace: Path | None = None
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[bytes] | None = None
        # the Python backend's shared-memory regions carry this prefix, so a region a killed server
        # left in /dev/shm is found and removed by `stop`
        self.shm_prefix = f"slab-deploy-{os.getpid()}-{secrets.token_hex(4)}"

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.ports['metrics']}/metrics"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def _backends(self) -> Path:
        """The backend folder to pass: the install's own, or (the wheel) a private one with the stub."""
        inst = self.install
        if inst.stub is None:
            return inst.backends
        assert self.workspace is not None
        mine = self.workspace / "backends"
        for backend in inst.available_backends:
            (mine / backend).mkdir(parents=True)
            for f in (inst.backends / backend).iterdir():
                if f.is_file():
                    (mine / backend / f.name).symlink_to(f)
        (mine / "python" / "triton_python_backend_stub").symlink_to(inst.stub)
        return mine

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libs = [
            p
            for p in (
                sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None,
                str(self.install.libs) if self.install.libs else None,
            )
            if p
        ]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        if libs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        return env

    def command(self, backends: Path) -> list[str]:
        return [
            str(self.install.binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            f"--http-address={HOST}",
            f"--http-port={self.ports['http']}",
            f"--grpc-address={HOST}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={HOST}",
            f"--metrics-port={self.ports['metrics']}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-verbose=0",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]

    def start(self, ready_timeout: float = READY_TIMEOUT_S) -> TritonServer:
        """Start the server and wait until it is ready; a server that exits or does not get ready
        in time is stopped and raises ServerError with the end of its log."""
        self.workspace = Path(tempfile.mkdtemp(prefix="slab-deploy-triton-"))
        try:
            if self.log_path is None and not self.verbose:
                self.log_path = self.workspace / "tritonserver.log"
            cmd = self.command(self._backends())
            with open(self.log_path or os.devnull, "ab") as log:
                # verbose: the server's log on our stderr (stdout stays the command's own)
                out = sys.stderr.fileno() if self.verbose else log.fileno()
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    env=self._env(),
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        keep = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("+-", "| "))]
        errors = [ln for ln in keep if ln.startswith("E") or "error" in ln.lower()]
        return "\n".join((errors or keep)[-lines:]) if keep else "(its log is above)"

    def ready(self) -> bool:
        """True when /v2/health/ready answers 200."""
        conn = http.client.HTTPConnection(HOST, self.ports["http"], timeout=2)
        try:
            conn.request("GET", "/v2/health/ready")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self.proc.returncode} before it was ready:\n"
                    f"{self.log_tail()}"
                )
            if self.ready():
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL its process group; returns its exit code."""
        code = None
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(
                            proc.pid, signal.SIGKILL
                        )  # its own group (start_new_session): the stubs too
                    proc.wait(timeout=grace)
            code = proc.returncode
            with contextlib.suppress(
                ProcessLookupError, PermissionError
            ):  # a stub left behind by a killed server
                os.killpg(proc.pid, signal.SIGKILL)
        if proc is not None:
            for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
                with contextlib.suppress(OSError):
                    region.unlink()
        if self.workspace is not None:
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.workspace = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


PLATFORM_BACKENDS = {
    "onnxruntime_onnx": "onnxruntime",
    "tensorrt_plan": "tensorrt",
    "pytorch_libtorch": "pytorch",
    "tensorflow_savedmodel": "tensorflow",
    "tensorflow_graphdef": "tensorflow",
}


def repository_models(repo: str | Path, install: TritonInstall) -> dict[str, str]:
    """{model: backend} of every model in `repo`, refused (ConfigError) before the server starts
    when Triton could not load it: a folder without a readable config.pbtxt, or a backend this
    server does not have (the nvidia-pytriton server has the Python backend only)."""
    from slab_deploy.serve.config import parse_config

    root = Path(repo)
    if not root.is_dir():
        raise ConfigError(
            f"{repo} is not a directory; pass a model repository written by `slab-deploy serve-repo`"
        )
    models: dict[str, str] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        cfg_path = d / "config.pbtxt"
        if not cfg_path.is_file():
            raise ConfigError(
                f"{d} has no config.pbtxt, and Triton loads every folder of a repository as a model: "
                "remove it, or write the model again with `slab-deploy serve-repo`"
            )
        try:
            cfg = parse_config(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {cfg_path}: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"{cfg_path}: {exc}") from None
        models[d.name] = cfg.backend or PLATFORM_BACKENDS.get(cfg.platform, cfg.platform)
    if not models:
        raise ConfigError(
            f"{repo} holds no model; write one with `slab-deploy serve-repo ARTEFACT_DIR -o {repo}`"
        )
    have = install.available_backends
    missing = {m: b for m, b in models.items() if b not in have}
    if missing:
        first = next(iter(missing))
        raise ConfigError(
            f"{first} needs Triton's {missing[first]} backend, which {install.binary} lacks (it has "
            f"{', '.join(have) or 'none'}): write it with --flavour python to serve it here, or serve "
            "the repository with the NGC Triton container (docs/serving.md)"
        )
    return models
