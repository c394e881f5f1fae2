"""Parameter importance for pruning-based side initialisation (the paper's Fisher information)."""
