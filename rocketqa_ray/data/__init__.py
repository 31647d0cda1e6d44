"""Data: BEIR readers and validation, the question splits, training examples."""
