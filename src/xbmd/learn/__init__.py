"""Learning (needs the ``train`` extra): the Lightning modules of the training stages,
augmentation, training data, config and the localiser's training. Networks and model bundles
live in ``xbmd.model``."""
