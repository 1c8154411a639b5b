"""perfusion: DSC-MRI perfusion maps and lesion scoring.

For research and decision support. Not a medical device and not a diagnosis.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dsc-perfusion")
except PackageNotFoundError:  # running from a checkout without installation
    __version__ = "0.0.0+unknown"

DISCLAIMER = (
    "For research and decision support only; not a medical device and not a diagnosis."
)

__all__ = ["__version__", "DISCLAIMER"]
