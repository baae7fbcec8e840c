"""WebDataset shards: reproducible tar writing (``writer``) and reading (``reader``)."""
