"""perfusion: DSC-MRI perfusion maps and lesion scoring.

For research and decision support. Not a medical device and not a diagnosis.

Use from Python (the same path as ``perfusion analyze``; units: s, mL/100 g, mL/100 g/min)::

    import perfusion
    case = perfusion.load_case("sub-01_dsc.nii.gz", rois=["lesion.nii.gz"])
    result = perfusion.analyze(case, perfusion.Config(method="model"))
    result.maps["cbv"], result.rois                # maps (x y z) and the scored lesions
    perfusion.save(result, case, "results/sub-01")  # maps, sidecars, report.json, report.html
"""

DISCLAIMER = (
    "For research and decision support only; not a medical device and not a diagnosis."
)

__all__ = ["__version__", "DISCLAIMER", "Case", "Config", "load_case", "analyze", "save"]

#: The public API, imported on first use (``import perfusion`` stays instant for the command line).
_API = {"Case": ("case", "Case"), "load_case": ("case", "load_case"), "analyze": ("case", "analyze_case"),
        "save": ("case", "save"), "Config": ("config", "Config")}


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
    if name in _API:
        from importlib import import_module

        module, attr = _API[name]
        value = getattr(import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'perfusion' has no attribute {name!r}")
