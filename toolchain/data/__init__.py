"""Data files shipped with sparseforge (the default calibration text)."""
