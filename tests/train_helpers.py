"""Shared by the training tests: a network small enough to take a few steps in seconds."""

SMALL = {
    "image_size": 64,
    "batch_size": 2,
    "val_fraction": 0.34,
    "generator": {"channels": [8, 16, 32]},
    "discriminator": {"scales": 2, "layers": 2, "channels": 8},
    "stages": {"1": {"epochs": 1}, "2": {"epochs": 1}, "3": {"epochs": 1}, "loc": {"epochs": 1}},
}
