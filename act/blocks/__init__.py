"""Layer 3, the building blocks: one concept per module, each usable alone. Fake quantization (`quant`:
`quantize(model, cfg, forward_loop)`), distillation nodes and losses, structured pruning and sparsity, unlabeled
images and their loader, label-free fidelity and labeled metrics, checkpoints, the NaN policy, TensorBoard logging,
DDP and the weight EMA. Imports from the core (and the model-family protocol) only."""
