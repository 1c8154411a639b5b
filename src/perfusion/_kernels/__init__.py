"""Numba kernels: private, small, no fastmath, each mirrored by a plain numpy reference in the tests.

deconv (SVD threshold search, model fits), curves (per-voxel curve features, leakage fits, gamma
variates, k-means), parallel (how the voxel loops are spread over cores), cache (where numba keeps
compiled kernels). Nothing outside perfusion.quantify calls these.
"""
