"""Generator role: sample completions with vLLM, score them, stream them to the buffer."""
