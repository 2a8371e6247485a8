"""lowrank.numpy: the reference implementation, written to be read (NumPy only, no torch)."""
