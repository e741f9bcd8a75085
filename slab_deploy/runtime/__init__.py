"""Runners: one interface over torch, ONNX Runtime and TensorRT (see base.py); `make_runner` builds one
by backend name.

Importing this package stays light: each runner module imports its runtime when it is used."""

from slab_deploy.runtime.base import Prepared, Runner, RunnerInfo, TimedRunner, UnsupportedBackend
from slab_deploy.runtime.factory import make_runner

__all__ = ["Prepared", "Runner", "RunnerInfo", "TimedRunner", "UnsupportedBackend", "make_runner"]
