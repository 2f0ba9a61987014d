"""From raw web data to a served generative model: crawl, curate, train, register and serve."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pipelines")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
