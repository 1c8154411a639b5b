"""perfusion: DSC-MRI perfusion maps and lesion scoring.

For research and decision support. Not a medical device and not a diagnosis.
"""

DISCLAIMER = (
    "For research and decision support only; not a medical device and not a diagnosis."
)

__all__ = ["__version__", "DISCLAIMER"]


def __getattr__(name: str):
    # the version is looked up on first use: importlib.metadata costs about 0.1 s at every start
    # (`perfusion --help` included), and most commands never print it
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("dsc-perfusion")
        except PackageNotFoundError:  # running from a checkout without installation
            value = "0.0.0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError(f"module 'perfusion' has no attribute {name!r}")
