"""The built-in passes, one module each. Importing this package registers them."""
from . import predictors, profile, relufy, weight_stats  # noqa: F401
