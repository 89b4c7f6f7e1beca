"""Data: the contract reader, importers, synthetic data, featurize and the per-rank loader."""
