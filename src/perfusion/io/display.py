"""How maps are drawn: voxel axes flipped and permuted into the radiological convention.

The figures of report.html and compare.html orient every slice from the images' affine (never from
the voxel order), so a DICOM analysis on dcm2niix's LAS grid and a NIfTI analysis on RAS draw alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: How rCBV is drawn over its background, in report.html, compare.html and the DICOM overlay (one
#: definition): the scale (ratio), the colour map and its opacity over the grey background, whose display
#: maximum is this percentile of the finite background voxels.
RCBV_RANGE = (0.0, 5.0)
RCBV_CMAP = "jet"
RCBV_ALPHA = 0.6
BACKGROUND_PERCENTILE = 99.5
#: ROI outlines: a light line over a black one so the outline reads on every colour of the jet scale and
#: on the grey background; the light colours are not in jet (white, magenta, pale pink, pale green).
ROI_OUTLINE_COLOURS = ("white", "#ff3df5", "#ffc0cb", "#b9f6ca")
#: The reference tissue's outline: black under a dashed light grey line.
REFERENCE_OUTLINE_COLOUR = "#e0e0e0"


def _nib():
    import nibabel

    return nibabel


#: Display axes per acquisition plane (the world axis the third voxel axis, the slice axis, runs
#: along), as nibabel axis codes of the directions the display array's axes grow toward. Figures draw
#: a slice's first axis left to right and its second bottom to top (imshow origin="lower"), so these
#: are the radiological convention: axial and coronal with the patient's right on the image's left
#: (axis 0 grows to the patient's left), anterior (axial) or superior (coronal, sagittal) up;
#: sagittal with anterior on the image's left. Slices run inferior to superior, posterior to anterior,
#: right to left.
DISPLAY_AXCODES = {"sagittal": ("P", "S", "L"), "coronal": ("L", "S", "A"), "axial": ("L", "A", "S")}


_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


@dataclass(frozen=True)
class DisplayGrid:
    """How the 3-D maps of one grid are drawn: voxel axes flipped and permuted (never resampled) into
    DISPLAY_AXCODES of the acquisition plane, the slice axis kept third. ``positions_mm`` is each
    display slice's world coordinate (mm, scanner RAS) along the slice normal; ``marks`` the patient
    direction at each image edge ('left', 'right', 'top', 'bottom')."""

    plane: str  # 'axial', 'coronal' or 'sagittal'
    axcodes: tuple[str, str, str]
    ornt: np.ndarray  # nibabel orientation transform, stored voxel axes -> display axes
    shape: tuple[int, int, int]  # stored (x, y, z)
    positions_mm: np.ndarray  # per display slice, mm

    @property
    def marks(self) -> dict[str, str]:
        c0, c1 = self.axcodes[0], self.axcodes[1]
        return {"left": _OPPOSITE[c0], "right": c0, "top": c1, "bottom": _OPPOSITE[c1]}

    def apply(self, data: np.ndarray) -> np.ndarray:
        """A 3-D array on the stored grid (x, y, z) in display orientation (a view: flips and a transpose)."""
        data = np.asarray(data)
        if tuple(data.shape[:3]) != self.shape:
            raise ValueError(f"array of shape {data.shape} is not on the grid {self.shape}")
        return _nib().orientations.apply_orientation(data, self.ornt)

    def display_slice(self, k: int) -> int:
        """The display index of stored slice ``k`` (the slice axis may be reversed)."""
        return self.shape[2] - 1 - int(k) if self.ornt[2, 1] < 0 else int(k)

    def position_label(self, d: int) -> str:
        """Display slice ``d``'s position as a letter and mm, e.g. 'S 12.0 mm' or 'I 4.5 mm' (the side of
        the scanner's origin along the slice normal; 0.001 mm rounding first, so float32 affines agree)."""
        axis = int(_nib().orientations.axcodes2ornt(self.axcodes)[2, 0])
        pos = round(float(self.positions_mm[d]), 3)
        letter = ("R", "A", "S")[axis] if pos >= 0 else ("L", "P", "I")[axis]
        return f"{letter} {abs(pos):.1f} mm"


def display_grid(affine: np.ndarray, shape: tuple[int, ...]) -> DisplayGrid:
    """The DisplayGrid of 3-D maps of ``shape`` (x, y, z, ...) on ``affine`` (voxel to world, mm): the
    plane from the world axis nearest to the third voxel axis (nibabel io_orientation, so an oblique
    grid gets its nearest plane's letters)."""
    nib = _nib()
    affine = np.asarray(affine, dtype=np.float64)
    shape3 = (int(shape[0]), int(shape[1]), int(shape[2]))
    start = nib.orientations.io_orientation(affine)
    plane = ("sagittal", "coronal", "axial")[int(start[2, 0])]
    codes = DISPLAY_AXCODES[plane]
    ornt = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(codes))
    disp_affine = affine @ nib.orientations.inv_ornt_aff(ornt, shape3)
    disp_shape = tuple(shape3[int(i)] for i in np.argsort(ornt[:, 0]))
    world_axis = int(start[2, 0])
    normal = np.cross(disp_affine[:3, 0], disp_affine[:3, 1])
    normal = normal / np.linalg.norm(normal)
    if normal[world_axis] < 0:
        normal = -normal  # along +x, +y or +z (R, A, S): the sign of the position is the scanner's
    corners = disp_affine @ np.stack([np.zeros(disp_shape[2]), np.zeros(disp_shape[2]),
                                      np.arange(disp_shape[2], dtype=np.float64), np.ones(disp_shape[2])])
    positions = normal @ corners[:3]
    return DisplayGrid(plane=plane, axcodes=codes, ornt=ornt, shape=shape3, positions_mm=positions)
