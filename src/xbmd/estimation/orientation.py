"""Is the radiograph upright? The anatomy's answer, when the file has no orientation tag.

The hip localiser was trained on upright AP radiographs: on an image turned by 90, 180 or 270
degrees it finds fewer heads, less surely (on the samples: 0.81-0.85 upright, 0.55-0.61 turned
180 degrees, one head or none turned 90). :func:`upright_turns` runs it on the four quarter
turns and takes the one where it is surest, if that beats the image as stored by
``ROTATION_MARGIN`` in summed head confidence.

What cannot be seen: a left-right mirror. An AP pelvis and its mirror image are both plausible
anatomy (the localiser is mirror-symmetric by design), so a mirrored file with no Patient
Orientation tag is read with its sides swapped; only the tag, the file's Image Laterality on a
one-hip image, or the lead side marker on the film can tell. For the same reason a file
mirrored top-bottom (upside down, not turned) comes out left-right mirrored once turned
upright: every turned image is reported with its sides uncertain.
"""

from __future__ import annotations

import numpy as np

from xbmd.model.localiser import HeadDetection, Localiser, locate_heads

#: Summed head confidence a quarter turn must gain over the stored image to be taken (the
#: measured gap on held-out virtual radiographs: docs/benchmarks.md, "Orientation").
ROTATION_MARGIN = 0.2


def upright_turns(
    localiser: Localiser, pixels: np.ndarray
) -> tuple[int, list[HeadDetection], dict[int, float]]:
    """Quarter turns (0-3, anticlockwise as ``np.rot90``) that make the radiograph upright.

    Returns the turns, the heads found in the image so turned (its pixel coordinates), and the
    summed confidence of each of the four.
    """
    found, scores = {}, {}
    for k in range(4):
        image = np.ascontiguousarray(np.rot90(pixels, k)) if k else pixels
        found[k] = locate_heads(localiser, image)
        scores[k] = sum(h.confidence for h in found[k])
    best = max(range(1, 4), key=lambda k: scores[k])
    turns = best if scores[best] - scores[0] > ROTATION_MARGIN else 0
    return turns, found[turns], scores


def describe_turns(turns: int) -> str:
    return {1: "90 degrees anticlockwise", 2: "180 degrees", 3: "90 degrees clockwise"}[turns]
