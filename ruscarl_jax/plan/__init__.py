"""The planner: compile a step's programs for a target slice (the TPU compiler for TPU slices, emulated CPU
devices otherwise) and read their memory, collectives, kernels and time from the compiled executables."""
