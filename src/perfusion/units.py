"""Physical constants and unit conversions, each with its source. Nothing else lives here.

Internal unit system (fixed at the I/O edges, never changed inside the pipeline):
time s; TE and TR s; delta R2* 1/s; CBV mL/100 g; CBF mL/100 g/min; MTT, TTP, Tmax s.
"""

#: Haematocrit in large vessels (the artery where the AIF is measured), dimensionless.
#: Rempp et al. 1994, Radiology 193:637; Ostergaard et al. 1996, MRM 36:715.
HCT_LARGE_VESSEL = 0.45

#: Haematocrit in capillaries, dimensionless. Same sources.
HCT_SMALL_VESSEL = 0.25

#: kH = (1 - Hct_large) / (1 - Hct_small) = 0.7333..., corrects for the plasma-only distribution
#: of the tracer (Rempp 1994).
KH = (1.0 - HCT_LARGE_VESSEL) / (1.0 - HCT_SMALL_VESSEL)

#: Brain tissue density in g/mL (Rempp 1994).
RHO_BRAIN_G_PER_ML = 1.04

#: Scale from a volume fraction (mL/mL) to mL/100 mL.
PER_100 = 100.0

#: Seconds per minute, for CBF in mL/100 g/min from a residue in 1/s.
SECONDS_PER_MINUTE = 60.0

# Plausibility limits for acquisition timing, used to catch milliseconds given as seconds.
#: Largest echo time we accept, in s (DSC uses 20-50 ms; 0.2 s is far beyond any GRE-EPI).
MAX_TE_S = 0.2
#: Largest repetition time we accept, in s (DSC uses 1-2 s).
MAX_TR_S = 10.0

#: NIfTI xyzt_units time codes (as nibabel names them) to a factor that gives seconds.
NIFTI_TIME_UNIT_TO_S = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}


def cbv_scale(kh: float = KH, rho: float = RHO_BRAIN_G_PER_ML) -> float:
    """Factor from an area ratio (dimensionless) to CBV in mL/100 g: kH / rho * 100."""
    return kh / rho * PER_100


def cbf_scale(kh: float = KH, rho: float = RHO_BRAIN_G_PER_ML) -> float:
    """Factor from a residue peak F*R(t) in 1/s to CBF in mL/100 g/min: kH / rho * 100 * 60."""
    return kh / rho * PER_100 * SECONDS_PER_MINUTE


#: Unit of each map ``analyze`` writes (the NIfTI sidecar's "Units"), by map name; report.html's colour
#: scales and the terminal summary name units from here. report.json's "units" describe per-ROI
#: figures, where "ftb" is a fraction of the ROI's voxels rather than the ftb map's class label.
MAP_UNITS = {
    "cbv": "mL/100 g", "cbf": "mL/100 g/min", "mtt": "s", "ttp": "s", "tmax": "s", "rcbv": "ratio",
    "srcbv": "standardized units", "gv_cbv": "mL/100 g", "gv_peak": "1/s", "gv_ttp": "s", "gv_fwhm": "s",
    "gv_quality": "ratio", "ftb": "label", "k2": "1/s", "cbv_uncorrected": "mL/100 g",
}
