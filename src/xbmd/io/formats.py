"""Which image format a file holds, from its first bytes: one sniffer for the radiograph reader
(``xbmd.io.xray``) and batch input (``xbmd.io.inputs``)."""

from __future__ import annotations


def sniff_format(head: bytes) -> str | None:
    """'dicom', 'png', 'jpeg' or 'tiff' from a file's first 132 bytes (its magic numbers), None
    when none matches. The one format sniffer of the readers and of batch input."""
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    return None
