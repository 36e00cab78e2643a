"""The user's SR tools: ``python -m sr_tools.infer`` (super-resolve a folder) and
``python -m sr_tools.evaluate`` (the paper's metrics over SR/HR folders)."""
