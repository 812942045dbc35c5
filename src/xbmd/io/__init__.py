"""Readers and writers: CT volumes and label maps (``xbmd.io.ct``), X-rays (``xbmd.io.xray``)."""
