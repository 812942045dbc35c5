"""The training set: the case manifest, the hip crop, `xbmd prepare` and the format."""
