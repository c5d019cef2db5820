"""CPU target descriptions (vector width, features, Numba cpu name, tiling)."""
