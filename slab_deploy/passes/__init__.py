"""nn.Module rewrites, one pass per file."""

from __future__ import annotations

from slab_deploy.models.folded import save_folded
from slab_deploy.passes.fold import FoldReport, NormFold, fold_model
from slab_deploy.passes.repbn_to_affine import RepBNToAffine
from slab_deploy.passes.unwrap_prepbn import UnwrapPRepBN

__all__ = ["FoldReport", "NormFold", "RepBNToAffine", "UnwrapPRepBN", "fold_model", "save_folded"]
