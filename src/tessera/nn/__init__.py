"""The shared trunk and its parts; knows nothing about images or audio."""
