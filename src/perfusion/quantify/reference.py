"""Reference tissue for rCBV (contralateral normal-appearing white matter) and standardised rCBV.

``auto_reference`` chooses normal-appearing white matter (NAWM) on the side away from the lesions:

1. Hemispheres (``hemispheres``): the patient's left-right axis is the voxel axis most aligned with
   RAS x in the affine (NIfTI world x grows towards the patient's right); the mid-sagittal plane is the
   plane across that axis about which the brain mask is most nearly its own mirror image (the maximum
   of the mask's autoconvolution along the axis), so a brain off the centre of the field of view is
   still split at its own midline. Voxels within ``MIDLINE_MARGIN_MM`` of that plane (falx,
   interhemispheric CSF, sagittal sinus) are never reference.
2. Side: every ROI lies on one side when at least ``ROI_SIDE_FRACTION`` of its voxels do. When all
   ROIs lie on one side the reference comes from the other; with no ROI, or ROIs on both sides (or
   across the midline), from both hemispheres, and ``info["why_side"]`` says so.
3. Candidates on that side: brain voxels (mask eroded by one voxel in-plane) with a positive CBV that
   are ``eligible`` (the pipeline passes non-enhancing voxels with a stable baseline), more than
   ``ROI_MARGIN_MM`` from every ROI (treated white matter around a lesion has a low CBV that would
   pull the reference down), at least 2 voxels from ``exclude`` (arterial and venous voxels) and 1
   voxel in-plane from vessels (CBV above the brain's ``VESSEL_PERCENTILE``), and not CSF: a voxel
   at least half of whose 8 in-plane neighbours (itself left out) have a CBV below
   ``CSF_CBV_FRACTION`` times the brain's median CBV has no perfusion signal around it (ventricles,
   sulci, a resection cavity); those voxels and the ring of voxels around them in-plane (partial
   volume) are CSF.
4. Each candidate's in-plane 8-neighbour median CBV (the voxel itself left out, so its own noise does
   not bias the choice; all 8 neighbours must be candidates, which also keeps a voxel away from CSF
   and from the excluded tissue) is split in two classes at its Otsu threshold, and must lie between
   the ``BAND`` percentiles of the lower class: low, homogeneous tissue, white matter. The split
   keeps grey matter out where it outnumbers white matter on a slice (a synthetic hemisphere of 63 %
   grey matter gave a median 47 % high with the band over all candidates, 0.5 % low with the split).
5. Fewer than ``MIN_REFERENCE_ML`` of such tissue on the preferred side: both hemispheres are tried,
   then the ROI margin is cut back to 2 voxels; each step is a warning and ``info["fallback"]`` says
   why. An empty mask is returned when nothing qualifies (the pipeline then asks for --reference).

``standardize_cbv``: histogram-landmark standardisation of the brain's CBV (Bedekar et al. 2010,
MRM 64:907, after Nyul & Udupa 1999, MRM 42:1072), no reference tissue.

The pipeline's reference stage: ``select_reference`` (the --reference mask or the automatic choice,
checked, with report.json's "reference" entry, results.Reference) and ``standardized`` (the srCBV map
and its entry).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from perfusion.errors import InputError
from perfusion.quantify.signal import otsu_threshold

#: Around every ROI, this much tissue (mm, 3-D) is never reference. Treated white matter around a
#: glioma (oedema, radiation injury: CBV about 0.5-0.7 x NAWM) extends well beyond the enhancing
#: lesion; the radiotherapy target volume adds 15-20 mm to it (ESTRO-ACROP guideline, Niyazi et al.
#: 2016, Radiother Oncol 118:35), so 15 mm keeps the reference out of the high-dose region. On
#: the contralateral side it matters only for lesions near the midline.
ROI_MARGIN_MM = 15.0

#: The last fallback's ROI margin, in voxels (the previous behaviour: a 5 x 5 x 5 dilation).
RELAXED_ROI_MARGIN_VOXELS = 2

#: Half-width (mm) of the slab around the mid-sagittal plane left out: falx, interhemispheric
#: fissure and sagittal sinus, and the plane's own uncertainty (a head roll of 3 degrees moves it by
#: about 3 mm at 60 mm from the centre of rotation).
MIDLINE_MARGIN_MM = 5.0

#: An ROI lies on one side when at least this fraction of its voxels does; otherwise it counts as
#: crossing the midline (a butterfly lesion) and the reference uses both hemispheres.
ROI_SIDE_FRACTION = 0.9

#: CSF (no perfusion signal): a voxel at least half of whose 8 in-plane neighbours have a CBV below
#: this fraction of the brain's median CBV (their median is at or below it). CSF's CBV is 0 plus noise;
#: white matter's is about 0.6 of the brain median where grey and white matter share the brain (CBV
#: about 2 and 4-5 mL/100 g), so the cut sits near half of white matter's CBV, between the two. The
#: neighbours, not the voxel's own value, decide, so the voxel's own noise does not (that would trim
#: white matter's low tail and bias the reference up).
CSF_CBV_FRACTION = 0.3

#: Percentiles of the neighbour-median CBV of the candidates' lower Otsu class that the reference
#: keeps (low, homogeneous tissue: white matter), and the vessel cut. The band over all candidates
#: since issue 4 (measured on the phantom); over the lower class since issue 15.
BAND = (10.0, 40.0)
VESSEL_PERCENTILE = 98.0

#: Less reference tissue than this (mL) on a side is "not found" there: a hand-drawn NAWM ROI is
#: about 0.5-1 mL (a 1 cm^2 circle on a few 5 mm slices); fewer voxels make the median noisy.
MIN_REFERENCE_ML = 0.5


@dataclass(frozen=True)
class Hemispheres:
    """The patient's left-right axis and mid-sagittal plane of a brain mask on a voxel grid.

    ``axis``: the voxel axis (0, 1 or 2) most aligned with RAS x; ``midline``: the plane's position
    along it in voxel indices (a multiple of 0.5); ``right_mm_per_voxel``: mm per voxel step along
    ``axis``, positive when a step goes towards the patient's right (RAS), negative when towards
    the left (LAS-like); ``symmetry``: fraction of brain voxels whose mirror image lies in the brain."""

    axis: int
    midline: float
    right_mm_per_voxel: float
    symmetry: float

    def offset_mm(self, shape: tuple[int, ...]) -> np.ndarray:
        """Signed distance (mm) of each voxel from the mid-sagittal plane, positive on the patient's
        right; shaped to broadcast against ``shape`` (x, y, z)."""
        view = [1] * len(shape)
        view[self.axis] = shape[self.axis]
        return ((np.arange(shape[self.axis]) - self.midline) * self.right_mm_per_voxel).reshape(view)

    def as_dict(self) -> dict:
        return {"axis": self.axis, "midline_index": self.midline,
                "index_increases_towards": "right" if self.right_mm_per_voxel > 0 else "left",
                "voxel_mm": abs(self.right_mm_per_voxel), "mirror_symmetry": round(self.symmetry, 4)}


def hemispheres(brain: np.ndarray, affine: np.ndarray) -> Hemispheres:
    """Left-right axis from ``affine`` (4 x 4 voxel-to-RAS mm) and the mid-sagittal plane of ``brain``
    (bool x y z): the plane, in half-voxel steps, that maximises the overlap of the mask with its
    mirror image. For each line of the mask along the axis, overlap(k) = sum_i b[i] b[k - i] is its
    autoconvolution; summed over lines (one FFT), its maximum gives the mirror plane k / 2. A plateau
    of equal overlaps gives its middle. ValueError for an empty mask."""
    b = np.asarray(brain, bool)
    if not b.any():
        raise ValueError("the brain mask is empty")
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(a, axis=0)
    axis = int(np.argmax(np.abs(a[0]) / norms))
    step = float(np.sign(a[0, axis]) * norms[axis])
    n = b.shape[axis]
    size = 2 * n  # >= 2n - 1: no wrap-around
    spec = np.fft.rfft(b.astype(np.float64), n=size, axis=axis)
    other = tuple(i for i in range(b.ndim) if i != axis)
    overlap = np.fft.irfft(np.sum(spec * spec, axis=other), n=size)[: 2 * n - 1]
    best = np.flatnonzero(overlap >= overlap.max() - 0.5)  # integer counts: exact ties
    k = float(np.round(np.median(best)))
    return Hemispheres(axis=axis, midline=k / 2.0, right_mm_per_voxel=step,
                       symmetry=float(overlap.max() / b.sum()))


def side_of(mask: np.ndarray, offset_mm: np.ndarray) -> str:
    """'left', 'right' or 'both' (patient sides) for a bool mask (x y z): the side holding at least
    ROI_SIDE_FRACTION of its voxels, else 'both'. ``offset_mm`` from Hemispheres.offset_mm."""
    off = np.broadcast_to(offset_mm, mask.shape)[mask]
    if off.size == 0:
        return "both"
    if np.mean(off > 0) >= ROI_SIDE_FRACTION:
        return "right"
    if np.mean(off < 0) >= ROI_SIDE_FRACTION:
        return "left"
    return "both"


#: The 8 in-plane neighbours of a voxel, as (dx, dy) offsets.
_NEIGHBOURS = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)]


def _neighbour_median(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Median over the 8 in-plane neighbours of each ``valid`` voxel, the voxel itself left out; NaN
    where any neighbour is invalid or off the grid, and at invalid voxels. Gathers the neighbours of
    the valid voxels only ((n_valid, 8) float64), not 8 copies of the volume."""
    v = np.pad(np.where(valid, values, np.nan), ((1, 1), (1, 1), (0, 0)), constant_values=np.nan)
    i, j, k = np.nonzero(valid)
    rows = np.stack([v[i + 1 + dx, j + 1 + dy, k] for dx, dy in _NEIGHBOURS], axis=1)
    out = np.full(np.shape(values), np.nan)
    out[i, j, k] = np.median(rows, axis=1)  # NaN where any neighbour is NaN
    return out


def _mostly_below(values: np.ndarray, valid: np.ndarray, cut: float) -> np.ndarray:
    """Voxels (bool x y z) at least half of whose valid in-plane neighbours (itself left out) have a
    value below ``cut``, or with no valid neighbour: their neighbour median is at or below ``cut``."""
    kernel = np.ones((3, 3, 1))
    kernel[1, 1, 0] = 0.0
    n = ndimage.correlate(valid.astype(np.float32), kernel, mode="constant")
    below = ndimage.correlate((valid & (values < cut)).astype(np.float32), kernel, mode="constant")
    return (2 * below >= n) | (n == 0)


@dataclass(frozen=True)
class ReferenceChoice:
    """The automatic reference: ``mask`` bool (x y z), ``info`` (report.json "reference": side,
    criteria, fallback) and ``warnings`` (one per fallback)."""

    mask: np.ndarray
    info: dict
    warnings: tuple[str, ...]


def _zooms(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def _band(cbv: np.ndarray, cand: np.ndarray, band) -> np.ndarray:
    """Candidates whose 8-neighbour median CBV lies within the ``band`` percentiles of that map's
    lower Otsu class."""
    if not cand.any():
        return cand
    nmed = _neighbour_median(cbv, cand)
    ok = cand & np.isfinite(nmed)
    if not ok.any():
        return ok
    low = ok & (nmed <= otsu_threshold(nmed[ok]))  # the lower of two classes: white matter, not grey
    lo, hi = np.percentile(nmed[low], band)
    return ok & (nmed >= lo) & (nmed <= hi)


def auto_reference(cbv: np.ndarray, brain: np.ndarray, *, affine: np.ndarray,
                   rois: dict[str, np.ndarray] | None = None, exclude: np.ndarray | None = None,
                   eligible: np.ndarray | None = None, band=BAND, vessel_percentile: float = VESSEL_PERCENTILE,
                   roi_margin_mm: float = ROI_MARGIN_MM, midline_margin_mm: float = MIDLINE_MARGIN_MM,
                   min_reference_ml: float = MIN_REFERENCE_ML) -> ReferenceChoice:
    """Automatic reference tissue: normal-appearing white matter away from the lesions (module docstring).

    ``cbv`` (mL/100 g, x y z, NaN where not computed), ``brain`` (bool x y z), ``affine`` (4 x 4,
    voxel -> RAS mm), ``rois`` (name -> bool x y z lesion masks), ``exclude`` (bool x y z: arterial
    and venous voxels), ``eligible`` (bool x y z: voxels that may be reference; None for all).
    Margins in mm, ``min_reference_ml`` in mL. Returns the mask (empty when nothing qualifies) with
    its ``info`` and warnings. Long because it is the module docstring's steps 1-5 in order, each reading
    the masks of the steps before."""
    cbv = np.asarray(cbv, dtype=np.float64)
    brain = np.asarray(brain, bool)
    rois = dict(rois or {})
    zooms = _zooms(affine)
    voxel_ml = float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    min_voxels = max(1, int(np.ceil(min_reference_ml / voxel_ml)))
    hemi = hemispheres(brain, affine)
    offset = np.broadcast_to(hemi.offset_mm(brain.shape), brain.shape)
    roi_sides = {name: side_of(np.asarray(m, bool), offset) for name, m in rois.items()}

    st = np.zeros((3, 3, 3), bool)
    st[:, :, 1] = True
    finite = np.isfinite(cbv) & brain
    base = ndimage.binary_erosion(brain, structure=st) & np.isfinite(cbv) & (cbv > 0)
    if exclude is not None and np.any(exclude):
        base &= ~ndimage.binary_dilation(exclude, structure=np.ones((5, 5, 5), bool))
    counts = {"brain": int(brain.sum()), "inner_positive_cbv": int(base.sum())}
    brain_median = float(np.median(cbv[finite])) if finite.any() else float("nan")
    if finite.any():
        vessels = finite & (cbv > np.percentile(cbv[finite], vessel_percentile))
        base &= ~ndimage.binary_dilation(vessels, structure=st)
        no_signal = brain & _mostly_below(cbv, finite, CSF_CBV_FRACTION * brain_median)
        csf = ndimage.binary_dilation(no_signal, structure=st) & brain  # and its partial-volume rim
        base &= ~csf
        counts["csf"] = int(csf.sum())
    if eligible is not None:
        base &= eligible
    counts["candidates"] = int(base.sum())
    union = np.zeros(brain.shape, bool)
    for m in rois.values():
        union |= np.asarray(m, bool)
    if union.any():
        far = ndimage.distance_transform_edt(~union, sampling=zooms) > roi_margin_mm
        near_relaxed = ndimage.binary_dilation(union, structure=np.ones((2 * RELAXED_ROI_MARGIN_VOXELS + 1,) * 3, bool))
    else:
        far = np.ones(brain.shape, bool)
        near_relaxed = np.zeros(brain.shape, bool)
    off_midline = np.abs(offset) > midline_margin_mm
    halves = {"right": off_midline & (offset > 0), "left": off_midline & (offset < 0), "both": off_midline}

    on = sorted(set(roi_sides.values()))
    if not rois:
        preferred, why = "both", "no ROI given: both hemispheres"
    elif on in (["left"], ["right"]):
        preferred = "right" if on == ["left"] else "left"
        why = f"every ROI lies on the patient's {on[0]}: contralateral ({preferred}) hemisphere"
    else:
        crossing = [n for n, s in roi_sides.items() if s == "both"]
        why = ("ROIs on both sides" if not crossing else f"ROI {', '.join(crossing)} crosses the midline") + \
              ": both hemispheres, away from every ROI"
        preferred = "both"
    attempts = [(preferred, far, f"{roi_margin_mm:g} mm")]
    if preferred != "both":
        attempts.append(("both", far, f"{roi_margin_mm:g} mm"))
    if union.any():
        attempts.append(("both", ~near_relaxed, f"{RELAXED_ROI_MARGIN_VOXELS} voxels"))

    notes: list[str] = []
    fallback = None
    mask = np.zeros(brain.shape, bool)
    used, margin_used = preferred, attempts[0][2]
    for i, (side, away, margin_text) in enumerate(attempts):
        mask = _band(cbv, base & away & halves[side], band)
        used, margin_used = side, margin_text
        if mask.sum() >= min_voxels:
            break
        if i + 1 < len(attempts):
            nxt_side, _, nxt_margin = attempts[i + 1]
            where = "the contralateral" if side != "both" else "either"
            reason = (f"too little normal-appearing white matter ({int(mask.sum())} voxels, fewer than "
                      f"{min_reference_ml:g} mL) on {where} side ({side}) more than {margin_text} from the ROIs; "
                      f"used {'both hemispheres' if nxt_side == 'both' else nxt_side} with an ROI margin of "
                      f"{nxt_margin}")
            if nxt_margin != margin_text:
                reason += ": the reference may include treated tissue around the lesions, which lowers it and " \
                          "raises every rCBV; give a normal-appearing white-matter mask with --reference"
            fallback = reason if fallback is None else f"{fallback}; then {reason}"
            notes.append(f"automatic reference: {reason}")
    if mask.sum() < min_voxels:
        found = int(mask.sum())
        reason = (("no normal-appearing white matter found" if not found else
                   f"only {found} voxels of normal-appearing white matter found (the median is noisy)")
                  + f": fewer than {min_reference_ml:g} mL even with an ROI margin of {margin_used}")
        fallback = reason if fallback is None else f"{fallback}; then {reason}"
        notes.append(f"automatic reference: {reason}; give a normal-appearing white-matter mask with --reference")
    info = {
        "automatic": True, "side": used, "preferred_side": preferred, "why_side": why,
        "roi_sides": roi_sides, "roi_margin": margin_used, "fallback": fallback,
        "hemispheres": hemi.as_dict(), "candidate_counts": counts,
        "criteria": {"roi_margin_mm": roi_margin_mm, "midline_margin_mm": midline_margin_mm,
                     "roi_side_fraction": ROI_SIDE_FRACTION, "csf_cbv_fraction_of_brain_median": CSF_CBV_FRACTION,
                     "brain_median_cbv": brain_median, "vessel_percentile": vessel_percentile,
                     "neighbour_median_band_percentiles": list(band), "min_reference_ml": min_reference_ml},
    }
    return ReferenceChoice(mask=mask, info=info, warnings=tuple(notes))


# --- plausibility of a reference tissue (the --reference mask or the automatic choice)

#: Fewest reference voxels inside the brain with a valid CBV: the same bar as a lesion's
#: (roi.MIN_ROI_VOXELS), a median over a handful of voxels is noise. Fewer is an input error, not a
#: verdict gate: every lesion is divided by this one median.
MIN_REFERENCE_VOXELS = 10

#: More than this fraction of the --reference mask outside the brain mask and the mask is not on this
#: series' brain (another case, grid or a slip of the drawing tool): an input error. The same bar as a
#: lesion's (roi.MAX_OUTSIDE_BRAIN_FRACTION); below it the outside voxels are dropped with a warning.
MAX_REFERENCE_OUTSIDE_FRACTION = 0.5

#: Plausible median CBV of white matter as a fraction of the brain's median CBV: outside it the
#: reference is not white matter and every lesion is not assessable ("implausible_reference").
#: Physiology: white matter has the brain's lowest perfused CBV (grey matter about twice it), so
#: white matter lies at or below the brain median (a brain of mostly grey matter puts it at about 0.5-0.7;
#: a brain mask holding CSF or necrosis moves the median down, towards white matter). Upper bound 1.5:
#: above the brain median by half again is grey matter, a high-CBV lesion or a vessel. Lower bound 0.3,
#: CSF_CBV_FRACTION: no perfusion signal (CSF, a cavity, necrosis); it would inflate every rCBV at
#: least twofold. Measured (`perfusion phantom` seeds 0-2 and `--realistic` seeds 0-2, default
#: analysis): the NAWM mask read 0.93-0.97 and the automatic reference 0.91-0.97; grey matter 1.91-1.92
#: (realistic), CBV blocks of 2x and 3x NAWM 1.92-1.95 and 2.80-2.84, the arterial and venous voxels
#: 10.5-35; the phantoms have no CSF.
REFERENCE_CBV_RATIO = (0.3, 1.5)

#: More than this fraction of the reference voxels on vessels (the arterial and venous voxels, and CBV
#: above the brain's VESSEL_PERCENTILE): the median is the vessels', not the tissue's (a median
#: tolerates less than half). Measured: 0 % for the NAWM mask and the automatic reference on the six
#: phantoms above.
MAX_REFERENCE_VESSEL_FRACTION = 0.5


def check_reference(cbv: np.ndarray, ref: np.ndarray, brain: np.ndarray, vessels: np.ndarray) -> tuple[dict, str]:
    """Is the reference tissue plausible white matter? ``cbv`` (mL/100 g, x y z, NaN where not
    computed), ``ref``, ``brain`` and ``vessels`` (arterial and venous voxels) bool (x y z).

    Returns (figures for report.json: the reference's median CBV over the brain's median, the fraction
    of its voxels on vessels, the bounds; the problem, "" when none). The problem is a verdict gate
    (roi "implausible_reference"), not an error: the maps stay valid."""
    cbv = np.asarray(cbv, dtype=np.float64)
    fin = np.asarray(brain, bool) & np.isfinite(cbv)
    ref = np.asarray(ref, bool) & np.isfinite(cbv)
    out = {"cbv_ratio_to_brain_median": float("nan"), "vessel_fraction": float("nan"),
           "cbv_ratio_bounds": list(REFERENCE_CBV_RATIO), "max_vessel_fraction": MAX_REFERENCE_VESSEL_FRACTION}
    if not fin.any() or not ref.any():
        return out, ""
    brain_median = float(np.median(cbv[fin]))
    on_vessel = np.asarray(vessels, bool) | (fin & (cbv > np.percentile(cbv[fin], VESSEL_PERCENTILE)))
    ratio = float(np.median(cbv[ref])) / brain_median if brain_median > 0 else float("nan")
    frac = float(np.mean(on_vessel[ref]))
    out.update({"cbv_ratio_to_brain_median": ratio, "vessel_fraction": frac})
    problems = []
    if frac > MAX_REFERENCE_VESSEL_FRACTION:
        problems.append(f"{frac:.0%} of the reference voxels lie on vessels (arterial or venous voxels, or CBV above "
                        f"the brain's {VESSEL_PERCENTILE:g}th percentile)")
    lo, hi = REFERENCE_CBV_RATIO
    if np.isfinite(ratio) and ratio > hi:
        problems.append(f"the reference's median CBV is {ratio:.2f} x the brain's median, above the {hi:g} x of white "
                        "matter (grey matter, a lesion or a vessel)")
    elif np.isfinite(ratio) and ratio < lo:
        problems.append(f"the reference's median CBV is {ratio:.2f} x the brain's median, below the {lo:g} x of white "
                        "matter (CSF, a cavity or necrosis: no perfusion)")
    return out, "; ".join(problems)


# --- standardised rCBV

#: Landmarks of the standardisation: percentiles of the brain's CBV and the standard-scale values
#: they map to. The 1st and 99.8th percentiles as the ends of the range (Nyul & Udupa 1999's p1 and
#: p2, which Bedekar et al. 2010 kept: the extreme voxels are noise and vessels) onto 0 and 4095
#: (Nyul & Udupa's 12-bit standard scale), and the median onto 1000: Bedekar learns the inner
#: standard values from a training cohort, which this tool does not have, so the median is pinned to
#: 1000 to make the unit readable ("1000: the brain's median CBV"). Values are therefore NOT on IB
#: Neuro's sRCBV scale and its thresholds do not apply.
STANDARD_PERCENTILES = (1.0, 50.0, 99.8)
STANDARD_VALUES = (0.0, 1000.0, 4095.0)
STANDARD_SOURCE = ("histogram-landmark standardisation (Bedekar et al. 2010, MRM 64:907; Nyul & Udupa 1999, "
                   "MRM 42:1072): piecewise-linear map of brain CBV percentiles onto a fixed standard scale")


def standardize_cbv(cbv: np.ndarray, brain: np.ndarray, *, percentiles=STANDARD_PERCENTILES,
                    standard=STANDARD_VALUES) -> tuple[np.ndarray, dict]:
    """Standardised CBV (Bedekar et al. 2010): the brain's CBV histogram mapped onto a standard scale
    by landmarks, with no reference tissue.

    ``cbv`` (mL/100 g, any shape, NaN where not computed) and ``brain`` (bool, same shape). The
    ``percentiles`` of the brain's finite CBV (increasing; defaults 1st, 50th and 99.8th) are the
    landmarks; CBV between two landmarks maps linearly between their ``standard`` values (defaults 0,
    1000, 4095 standardized units); below the first or above the last landmark the end segment's
    line is extended, so the map is strictly increasing everywhere (lesions above the 99.8th
    percentile keep their order). A global scale of the CBV map leaves the result unchanged.

    Returns (float64 map of ``cbv``'s shape in standardized units, NaN where ``cbv`` is not finite;
    landmarks: {"percentiles", "cbv" (mL/100 g), "standard", "units", "source"}). ValueError when the
    brain has fewer than 2 finite CBV values or two landmarks coincide (a flat histogram)."""
    cbv = np.asarray(cbv, dtype=np.float64)
    pct = np.asarray(percentiles, dtype=np.float64)
    std = np.asarray(standard, dtype=np.float64)
    if pct.ndim != 1 or pct.size < 2 or pct.shape != std.shape:
        raise ValueError("percentiles and standard must be 1-D of one length, at least 2")
    if np.any(np.diff(pct) <= 0) or np.any(np.diff(std) <= 0) or pct[0] < 0 or pct[-1] > 100:
        raise ValueError("percentiles (0-100) and standard values must increase")
    values = cbv[np.asarray(brain, bool) & np.isfinite(cbv)]
    if values.size < 2:
        raise ValueError("the brain has fewer than 2 finite CBV values")
    marks = np.percentile(values, pct)
    if np.any(np.diff(marks) <= 0):
        raise ValueError(f"CBV landmarks {marks.tolist()} do not increase: the brain's CBV histogram is flat")
    seg = np.clip(np.searchsorted(marks, cbv, side="right") - 1, 0, marks.size - 2)
    out = np.full(cbv.shape, np.nan)
    ok = np.isfinite(cbv)
    s = seg[ok]
    out[ok] = std[s] + (cbv[ok] - marks[s]) * (std[s + 1] - std[s]) / (marks[s + 1] - marks[s])
    landmarks = {"percentiles": pct.tolist(), "cbv": marks.tolist(), "standard": std.tolist(),
                 "units": "standardized units", "source": STANDARD_SOURCE}
    return out, landmarks


# --- the pipeline's reference stage


def select_reference(cbv: np.ndarray, brain: np.ndarray, *, affine: np.ndarray, given: np.ndarray | None,
                     given_source: str, rois: dict[str, np.ndarray], exclude: np.ndarray, eligible: np.ndarray,
                     vessels: np.ndarray, where: str):
    """The reference tissue (bool x y z) for rCBV: the --reference mask ``given`` (from ``given_source``),
    taken inside the brain, or ``auto_reference`` (contralateral normal-appearing white matter;
    ``eligible``: non-enhancing, stable baseline; ``exclude``: arterial and venous voxels). Returns
    (results.Reference: source, automatic, side, voxels, median CBV mL/100 g and IQR, for the automatic
    choice its criteria and any fallback, "plausibility": ``check_reference``'s figures and problem,
    a verdict gate), the mask and warnings. ``cbv`` mL/100 g (x y z); ``vessels``: arterial and
    venous voxels (bool x y z). InputError naming ``where`` when fewer than MIN_REFERENCE_VOXELS voxels
    of a given mask (any for the automatic one) have a valid CBV, or the median is not positive."""
    from perfusion.results import Reference

    if given is not None:
        fields, ref_mask, notes = _given_reference(cbv, brain, affine=affine, given=given, source=given_source)
    else:
        choice = auto_reference(cbv, brain, affine=affine, rois=rois, exclude=exclude, eligible=eligible)
        ref_mask, notes = choice.mask, list(choice.warnings)
        fields = {"source": "automatic (normal-appearing white matter: low, homogeneous CBV on the side away from "
                            "the ROIs; non-enhancing, stable baseline, away from ROIs, midline, vessels and CSF; see "
                            "README)", **choice.info}
    median = _reference_median(cbv, ref_mask, given=given is not None, fallback=fields.get("fallback"), where=where)
    figures, problem = check_reference(cbv, ref_mask, brain, vessels)
    if problem:
        notes.append(f"reference tissue not plausible white matter: {problem}; every lesion is not assessable")
    q25, q75 = np.percentile(cbv[ref_mask], [25, 75])
    entry = Reference(**fields, n_voxels=int(ref_mask.sum()), cbv_median=median, cbv_iqr=(float(q25), float(q75)),
                      plausibility={**figures, "problem": problem or None})
    return entry, ref_mask, notes


def _given_reference(cbv, brain, *, affine, given, source: str) -> tuple[dict, np.ndarray, list[str]]:
    """A --reference mask: its voxels inside the brain with a finite CBV, the entry's first fields
    (source, automatic, side, fallback, hemispheres) and a warning for voxels left out."""
    notes = []
    outside = int((given & ~brain).sum())
    if outside:
        notes.append(f"{outside} of the reference mask's {int(given.sum())} voxels lie outside the "
                     "brain mask and were left out")
    ref_mask = given & brain & np.isfinite(cbv)
    hemi = hemispheres(brain, affine)
    fields = {"source": source, "automatic": False, "side": side_of(ref_mask, hemi.offset_mm(brain.shape)),
              "fallback": None, "hemispheres": hemi.as_dict()}
    return fields, ref_mask, notes


def _reference_median(cbv, ref_mask, *, given: bool, fallback: str | None, where: str) -> float:
    """The reference's median CBV (mL/100 g), or InputError naming ``where`` (module: select_reference)."""
    if not ref_mask.any():
        why = f" ({fallback})" if fallback else ""
        raise InputError(f"{where}: no reference voxel with a valid CBV{why}; "
                         "give a normal-appearing white-matter mask with --reference")
    if given and ref_mask.sum() < MIN_REFERENCE_VOXELS:
        raise InputError(f"{where}: only {int(ref_mask.sum())} reference voxels have a valid CBV, fewer than "
                         f"{MIN_REFERENCE_VOXELS}; draw the reference in normal-appearing white matter, "
                         "about 0.5 mL")
    median = float(np.median(cbv[ref_mask]))
    if not median > 0:
        raise InputError(f"{where}: reference CBV median is {median:.3g}, "
                         "not positive; give a normal-appearing white-matter mask with --reference")
    return median


def standardized(cbv: np.ndarray, brain: np.ndarray, rois: dict[str, np.ndarray]):
    """Standardised rCBV (``standardize_cbv`` of the CBV map, mL/100 g x y z): (the map in standardized
    units, float32 x y z, or None when the brain's CBV histogram has no usable landmarks;
    results.Standardized with each ROI's median; warnings)."""
    from perfusion.results import Standardized

    try:
        srcbv, landmarks = standardize_cbv(cbv, brain)
    except ValueError as exc:
        return None, Standardized(landmarks=None, rois={}, why_not=str(exc)), [
            f"standardised rCBV not computed: {exc}"]
    rois_median = {n: (float(np.nanmedian(srcbv[m])) if np.isfinite(srcbv[m]).any() else float("nan"))
                   for n, m in rois.items()}
    return srcbv.astype(np.float32), Standardized(landmarks=landmarks, rois=rois_median), []
