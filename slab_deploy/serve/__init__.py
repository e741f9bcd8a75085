"""Serving exported SLAB models with Triton Inference Server.

  options.py       RepoOptions: flavour, batching, instances, accelerators (refused before any work)
  artifact.py      the export directory read for serving (manifest, graph sha256, TensorRT engine)
  config.py        config.pbtxt from the export and the options; parsed back with Triton's protobuf
  repository.py    write_triton_repository: REPO/<model>/ as one transaction
  python_model.py  the python flavour's model.py (ONNX Runtime on the CPU inside Triton)
  server.py        TritonServer: a real tritonserver on 127.0.0.1, started and stopped cleanly
  load.py          run_load: concurrent clients for a bounded time, throughput and latency

Nothing here imports tritonclient, onnxruntime or torch at import time.
"""

from __future__ import annotations

from slab_deploy.serve.options import RepoOptions
from slab_deploy.serve.repository import RepoResult, write_triton_repository

__all__ = ["RepoOptions", "RepoResult", "write_triton_repository"]
