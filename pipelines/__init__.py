"""From raw web data to a served generative model: crawl, curate, train, register and serve."""

import logging
import warnings
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pipelines")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

# Two library messages a user can do nothing about, in every process that imports the package (the driver and
# Ray's workers): peft reads a property transformers has deprecated, each time an adapter is put on a model; and
# transformers advises installing torchvision for an image processor, but the index's torchvision is a CUDA build
# that breaks the CPU torch, and the PIL processor it falls back to is the one used here.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())
