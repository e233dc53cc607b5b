"""Pure RL math on tensors: no config objects, no I/O. Every equation asyncrl uses is here."""
