"""`xbmd evaluate`: the validation toolkit, its statistics and its HTML report."""
