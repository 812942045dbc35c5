"""Learning: networks, training stages, the hip localiser and the model bundle."""
