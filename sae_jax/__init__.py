"""sae-jax: Top-K sparse autoencoders on vision-language model activations, in JAX."""

__version__ = "0.1.0"
