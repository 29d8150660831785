"""Layer 1, the core: what a run is asked to do and the vocabulary every other layer speaks. The typed, validated
config (`config`), errors and exit codes, the registries of extension points (`registry`: distillation losses,
calibrators, stage kinds), the model-family protocol and its registry (`family`, `family_base`), atomic file writes,
signals, optional dependencies, metric targets and result tables. Imports nothing from act above it; model
libraries (Ultralytics) never appear here."""
