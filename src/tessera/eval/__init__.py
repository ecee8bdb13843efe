"""Evaluation: tokenizer and codec reconstruction, FID / FD-EffNetLite0 / classifier FD with IS and
precision/recall (torch-fidelity parity), and the exactly scored compositional benchmark."""
