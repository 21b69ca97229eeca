"""Data: folder scanning and splits, safe image loading, transforms, the demo dataset."""
