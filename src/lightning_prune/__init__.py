"""lightning-prune: physical channel pruning while training with PyTorch Lightning."""
