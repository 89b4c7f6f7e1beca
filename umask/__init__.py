"""U-MASK in plain PyTorch, and everything needed to run a trained model without the trainer.

The method: U-SCOPE, masks, DiT, diffusion, losses, metrics, kernels. Its inputs: the feature
spec (spec.py), the contract reader (contract.py) and events -> examples (slots.py). A trained
model's export bundle: its format (bundle_format.py), its loader (bundle.py), completion
(completion.py) and user embeddings (user_embeddings.py).

Imports torch, numpy, pyarrow and safetensors only: no Ray, no DeepSpeed, no TorchRec, no
process groups, no trainer/ or embeddings/. umask/pyproject.toml installs it on its own.
"""
