"""Data: procedural shapes, real-data converters, WebDataset shards and the batch loader."""
