"""One module per ``xbmd`` command; each exposes ``HELP`` and ``main``."""
