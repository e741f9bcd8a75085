"""User-facing errors.

Every `SlabDeployError` is a problem with the user's input or environment; the CLI
prints its one-line message (which says how to fix it) and exits with `exit_code`,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class SlabDeployError(Exception):
    """Base class of the errors a user can fix."""

    exit_code: int = 1


class MissingDependencyError(SlabDeployError):
    """An optional dependency is not installed."""


class ModelNotFoundError(SlabDeployError, KeyError):
    """Unknown model name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(SlabDeployError):
    """A checkpoint file is missing, corrupt, unsafe or does not fit the model."""


class UnfinishedPRepBNError(CheckpointError):
    """The PRepBN schedule of a checkpoint had not finished when it was saved."""


class UnsupportedInputError(SlabDeployError):
    """An input shape, dtype or option the model or runtime cannot handle."""


class FoldError(SlabDeployError):
    """A fold was asked for that would change the model's results."""


class ExportError(SlabDeployError):
    """ONNX export or an ONNX pass failed."""


class ArtifactError(SlabDeployError):
    """An artefact (ONNX file, engine, report) is missing or invalid."""


class ConfigError(SlabDeployError):
    """A profile or option value is invalid."""


class ParityError(SlabDeployError):
    """Outputs differ beyond tolerance. Exit code 3, so CI can tell wrong numbers from crashes."""

    exit_code = 3


class RegressionError(SlabDeployError):
    """A benchmark regressed beyond its threshold compared with an earlier run."""

    exit_code = 4


class BenchCaseError(SlabDeployError):
    """A benchmark case failed, or nothing was measured. Exit code 5, so CI can tell a broken case
    from a slow one (4) and from bad input (1)."""

    exit_code = 5


class FailedExportError(SlabDeployError):
    """Base of the export failures that keep the failed artefact set for inspection in `failed_dir`
    (beside the untouched output directory)."""

    def __init__(self, message: str, failed_dir: Path) -> None:
        super().__init__(message)
        self.failed_dir = failed_dir


class ExportParityError(FailedExportError, ParityError):
    """The exported graph does not match the checkpoint model (exit code 3)."""

    exit_code = 3


class ExportLintError(FailedExportError, ExportError):
    """The folded graph still has norm nodes where none may be left."""

    exit_code = 1
