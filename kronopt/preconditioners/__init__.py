"""One module per algorithm, each a small file of math on the shared engine."""
