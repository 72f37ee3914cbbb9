"""The sparse family: methods that decide which entries of a parameter tree may change (masks,
structured selections, learned masks, subspaces, pruning) and store the result as sparse
deltas that compose by addition."""
