"""Storage formats: quantizers, packing, the format registry and the pure-PyTorch references.

The lowest layer of quantduo: it imports nothing else from the package and holds no ``torch.nn`` modules.
"""
