"""Image data: sources, preparation into a memory-mappable folder, augmentation and keyed batches."""
