"""Fitting that two stages share: the sequence model's training loop and its leakage-free folds (stage 4, the
ensemble's sequence model), the pseudo-labels a round trains on (stages 2 and 4), the second-level combiners of an
ensemble. Stands on scoring, networks and below; beside clinical and synthetic."""
