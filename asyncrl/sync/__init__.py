"""Weight sync: the learner-side sender and the vLLM-side receiver, side by side so they agree."""
