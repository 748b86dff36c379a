"""Training the EDJE adapter and joint encoder on small real data, and its corpus (README "Quality").

training/sources.py      image-text pairs from packages (Tux Paint, emoji, Openclipart)
training/data.py         WebDataset shards + captions table, the held-out split (``make quality-data``)
training/features.py     the backbone's raw tokens per image, computed as the indexer computes them (the cache)
training/sentence.py     MiniLM sentence embeddings (the first stage's text side)
training/first_stage.py  ridge map image feature -> sentence embedding
training/metrics.py      recall at k, top-1 agreement, Kendall tau
training/config.py       the run's configuration and flags (no torch: ``edje-index`` imports it)
training/train.py        the training entry point (``edje-index train``)
"""
