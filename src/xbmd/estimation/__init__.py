"""`xbmd estimate`: the estimator, its results and their figures."""
