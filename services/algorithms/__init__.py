"""RL algorithms by name (``algorithm.name``): see ``services.algorithms.base``."""
