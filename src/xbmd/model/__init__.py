"""The trained model at inference: networks, the model bundle, model inputs, the localiser."""
