"""The data pipeline: HR images -> training pairs (crop, flip, degradation, prompt).

Shared by every consumer of training data: the GDPO rollout workers, NAOSD
pre-training and the learning benchmark.  ``source`` turns an integer index
into a pair; ``degradation``/``kernels`` are the Real-ESRGAN second-order
degradation; ``images`` reads and converts image files; ``prompts`` is the
pluggable text source.
"""
