"""A radiograph's display orientation: turning a stored image into the standard AP display.

xbmd's convention (docs/geometry.md): an AP radiograph is shown as it is read, the patient's
right on the image's left (rows running towards the patient's left, "L"), the head at the top
(columns running towards the feet, "F"). A file may store its pixels otherwise and say so:

- DICOM Patient Orientation (0020,0020): the patient directions of the rows and of the
  columns (e.g. ``['R', 'F']``: mirrored left-right; ``['L', 'H']``: upside down;
  ``['F', 'L']``: turned by 90 degrees);
- an EXIF Orientation tag (JPEG, TIFF, some PNG): the camera-roll rotations and mirrors.

:func:`standardise` returns the pixels in the standard orientation with a description of what was
done, so the reader can warn about it. With no tag, nothing can be known here: the estimator
checks the anatomy (``xbmd.estimation.orientation``).
"""

from __future__ import annotations

import numpy as np

#: Standard AP display: rows run towards the patient's left, columns towards the feet.
STANDARD = ("L", "F")
_AXES = {"L": "R", "R": "L", "F": "H", "H": "F", "A": "P", "P": "A"}
#: EXIF Orientation values -> (transpose first, flip rows, flip columns) that undo them.
_EXIF = {
    1: (False, False, False),
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, False, True),
    7: (True, True, True),
    8: (True, True, False),
}


def _primary(value: str) -> str | None:
    """The first patient direction of a Patient Orientation value ('LP' -> 'L'), if any."""
    value = str(value).strip().upper()
    return value[0] if value and value[0] in _AXES else None


def patient_orientation_ops(value) -> tuple[bool, bool, bool] | None:
    """(transpose, flip rows, flip columns) that bring pixels described by a Patient Orientation
    value to the standard AP display; None when the value is missing or not a frontal one
    (anterior/posterior directions: a lateral view)."""
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    rows_dir, cols_dir = _primary(value[0]), _primary(value[1])
    if rows_dir is None or cols_dir is None:
        return None
    transpose = rows_dir in "FH" and cols_dir in "LR"
    if transpose:
        rows_dir, cols_dir = cols_dir, rows_dir
    if rows_dir not in "LR" or cols_dir not in "FH":
        return None
    return transpose, cols_dir == "H", rows_dir == "R"


def exif_ops(orientation: int | None) -> tuple[bool, bool, bool] | None:
    """(transpose, flip rows, flip columns) undoing an EXIF Orientation value (None: unknown)."""
    return _EXIF.get(int(orientation)) if orientation else None


def apply_ops(pixels: np.ndarray, ops: tuple[bool, bool, bool]) -> np.ndarray:
    """Pixels (rows, cols) transposed first, then flipped as ``ops`` says (a copy)."""
    transpose, flip_rows, flip_cols = ops
    out = pixels.T if transpose else pixels
    if flip_rows:
        out = out[::-1]
    if flip_cols:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def describe(ops: tuple[bool, bool, bool]) -> str:
    """Words for what ``ops`` did ('mirrored left-right', 'turned 180 degrees', ...)."""
    transpose, flip_rows, flip_cols = ops
    if not transpose:
        return {
            (False, False): "",
            (False, True): "mirrored left-right",
            (True, False): "upside down (mirrored top-bottom)",
            (True, True): "turned 180 degrees",
        }[(flip_rows, flip_cols)]
    return {
        (False, False): "transposed (rows and columns swapped)",
        (False, True): "turned 90 degrees clockwise",
        (True, False): "turned 90 degrees anticlockwise",
        (True, True): "transposed across the other diagonal",
    }[(flip_rows, flip_cols)]
