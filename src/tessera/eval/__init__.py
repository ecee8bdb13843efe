"""Evaluation: tokenizer reconstruction now; FID, IS, precision/recall and compositional scores later."""
