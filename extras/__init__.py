"""What a real tool needs and a lesson does not. A student never has to open this folder to follow
one training step. Each module is named for what it holds: config (the knobs' flags and checks),
checkpoints (save and load, --init, --resume, the SFT model's reuse), files (atomic writes, the
folder lock, the metrics file), distributed (torchrun), report (what a run prints), stopping
(signals, non-finite steps), generation (batched completions), formats (JSONL data), splits
(which data a run reads, what it holds out), speedups (levers that compute the same thing
faster), hf_gpt2 (GPT-2 weights in and out), exercises (a student copy of the repo with regions
to write, graded by the tests)."""
