"""Generators: an embedding of units + the shared trunk + a head + a loss, one file per paradigm."""
