"""The training system around the method: the u-mask CLI (cli.py), the run config (config.py),
and one subpackage per idea: data (contract reader, importers, synth, featurize, loader),
training (Ray driver, worker loop, checkpoints) and inference (loading a trained checkpoint,
eval, complete)."""
