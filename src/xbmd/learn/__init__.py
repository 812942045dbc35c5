"""Learning (needs the `train` extra): the Lightning modules of the training stages, augmentation, training data, config and the localiser's training; networks and bundles live in ``xbmd.model``."""
