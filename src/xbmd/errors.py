"""Exceptions raised by xbmd. The CLI turns them into one-line messages and a non-zero exit."""


class XbmdError(Exception):
    """Base class of every error xbmd raises on purpose (bad input, failed fit, ...)."""


class InputError(XbmdError):
    """A file or argument cannot be used: unreadable, wrong modality, no spacing, absurd values."""


class CalibrationError(XbmdError):
    """A CT calibration could not be made or is not trustworthy."""


class GeometryError(XbmdError):
    """A geometry or pose is inconsistent (a point behind the source, a bad detector)."""
