"""Helper kernels over one row (one voxel's curve) shared by the deconvolution and the curve kernels."""

from __future__ import annotations

import numpy as np

from perfusion._kernels.jit import kernel


@kernel
def row_finite(row):
    """True when every value of a 1-D row is finite."""
    for i in range(row.shape[0]):
        if not np.isfinite(row[i]):
            return False
    return True
