"""The built-in passes, one module each. Importing this package registers them."""
from . import emit, pack, predictors, profile, quantize, relufy, reorder, weight_stats  # noqa: F401
