"""flax_textvae: text VAEs from pretrained seq2seq Transformers, in JAX/Flax."""
__version__ = "0.1.0"
