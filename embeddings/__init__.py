"""The sparse side: app and location tables, id hashing, sharding plans, TorchRec modules, checkpoints."""
