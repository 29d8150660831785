"""Layer 6, orchestration: which runs, in which order. Stage kinds and staged runs (prune -> quant), per-layer
sensitivity analysis and `quant.skip: auto`, `strategy: auto` (PTQ probe, QAT if needed; with a budget, the best
point of the accuracy-latency frontier), `act frontier`, and `AutoCompression`, the facade that picks one."""
