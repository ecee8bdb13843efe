"""Tokenizers: signal <-> units. Each is trainable and loadable on its own.

`vq` holds the image VQ tokenizer (conv encoder/decoder, l2-normalised codebook, optional
patch-GAN); `text` holds the caption tokenizer in the HF `tokenizers` JSON format.
"""
