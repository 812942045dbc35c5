"""xbmd next to a PACS: DICOM results (a TID 1500 SR and a Secondary Capture) and the Orthanc
service behind ``xbmd serve`` (docs/pacs.md).

Modules, one idea each:

- ``codes``: the coded concepts of the SR (a private scheme for what no standard code says);
- ``uids``: deterministic UIDs of the outputs, derived from the source instance and the model;
- ``render``: the overlay image (numpy and PIL only, with the research-use banner);
- ``sr``: the TID 1500 measurement report; ``capture``: the Secondary Capture;
- ``outputs``: both for one radiograph, and their files (``xbmd estimate --dicom-out``);
- ``config``, ``jobs`` (the SQLite queue), ``orthanc`` (the REST client), ``service`` (the loops),
  ``web`` (the worklist), ``sandbox`` (a throw-away Orthanc in a network namespace, for tests and
  benchmarks).

Heavy imports (highdicom, FastAPI) stay inside these modules; nothing here is imported by
``xbmd --help``.
"""
