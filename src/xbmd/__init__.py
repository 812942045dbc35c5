"""xbmd: bone mineral density from a single plain hip X-ray.

See README.md for the quick start and docs/ for geometry, units and data formats.
"""

__version__ = "0.1.0"
