"""How lossily a JPEG was compressed: its quality estimated from its quantisation tables.

JPEG encoders (libjpeg and its descendants, used by PACS and cameras alike) scale the standard
luminance table of ITU-T T.81 Annex K by the quality q (the IJG formula). The quality of a file
is the q whose scaled table is closest to the file's first table; it is what the estimator's
quality gate compares with the lowest quality measured to be safe. An encoder with tables of
its own gets the quality of the nearest IJG table, which is an approximation (said in the
result's warning).
"""

from __future__ import annotations

import numpy as np

#: ITU-T T.81 Annex K, table K.1: luminance quantisation (natural order).
_STANDARD_LUMINANCE = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
     14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
     18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    dtype=np.float64,
)  # fmt: skip


def ijg_table(quality: int) -> np.ndarray:
    """The luminance table libjpeg uses at ``quality`` (1-100), baseline (values 1-255)."""
    quality = int(np.clip(quality, 1, 100))
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return np.clip(np.floor((_STANDARD_LUMINANCE * scale + 50) / 100), 1, 255)


def quality_from_table(table) -> int:
    """The IJG quality whose luminance table is nearest to ``table`` (64 values, any order:
    compared by their sum, which falls monotonically with the quality)."""
    total = float(np.sum(np.asarray(table, dtype=np.float64)))
    sums = np.array([ijg_table(q).sum() for q in range(1, 101)])
    return int(np.argmin(np.abs(sums - total))) + 1


def quality_from_bytes(data: bytes) -> int | None:
    """The quality of a JPEG stream (its first DQT table), None when it has none (lossless
    JPEG, JPEG 2000, JPEG-LS)."""
    i = 2 if data[:2] == b"\xff\xd8" else None
    if i is None:
        return None
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDB:  # define quantisation table(s): precision/id byte, then 64 values
            precision = data[i + 4] >> 4
            size = 2 if precision else 1
            body = data[i + 5 : i + 5 + 64 * size]
            values = np.frombuffer(body, dtype=">u2" if size == 2 else np.uint8)
            return quality_from_table(values.astype(np.float64))
        if marker == 0xDA:  # start of scan: no table before it
            return None
        i += 2 + length
    return None
