"""What a real tool needs and a lesson does not. A student never has to open this folder to follow
one training step: runtime (checkpoints, --init, --resume, signals, torchrun), speedups (levers
that compute the same thing faster), hf_gpt2 (Hugging Face GPT-2 weights in and out),
exercises (a student copy of the repo with regions to write, graded by the tests)."""
