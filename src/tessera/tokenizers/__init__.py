"""Tokenizers: signal <-> units. Each is trainable and loadable on its own.

`vq` holds the image VQ tokenizer (conv encoder/decoder, l2-normalised codebook, optional
patch-GAN); `multiscale` VAR's residual multi-scale quantiser over the same VQ; `continuous`
the KL autoencoder (diffusers AutoencoderKL) for flow heads; `audio` the EnCodec-style audio
codec (SEANet convs in `audio_modules`, K-stage residual VQ in `residual_vq`); `text` the caption
tokenizer in the HF `tokenizers` JSON format.
"""
