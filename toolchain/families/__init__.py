"""Architecture registry: one class per model family, registered by HF ``architectures`` name.

Adding a family is one new module here that defines a :class:`ModelFamily` subclass
decorated with :func:`register`, plus its import below.
"""
from .base import ModelFamily, family_for_architecture, family_named, register, registered_architectures
from . import bert, llama  # noqa: F401  (registers the families)

__all__ = ["ModelFamily", "family_for_architecture", "family_named", "register", "registered_architectures"]
