"""sorajax: a Sora-class text-to-video system in JAX/Flax NNX.

Parameters carry *logical* sharding names (see sorajax/sharding.py). We keep
Flax's eager sharding off so modules can be built with no mesh in context: the
trainer maps logical names to mesh axes itself and initialises sharded via
jit(init, out_shardings=...).
"""
import flax

flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
