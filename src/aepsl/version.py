"""The installed package's version (what every output's config.yaml records)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aepsl")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
