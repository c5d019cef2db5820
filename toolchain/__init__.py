"""sparseforge's driver: model IR, frontends, pass manager, recipes and the CLI."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sparseforge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
