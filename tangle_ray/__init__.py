"""tangle_ray: weight-entangled neural architecture search at cluster scale, on Ray and DeepSpeed."""

from tangle_ray.errors import ConfigError
from tangle_ray.space import Arch, SearchSpace, available_spaces, load_space
from tangle_ray.supernet import Supernet

__all__ = ["Arch", "ConfigError", "SearchSpace", "Supernet", "available_spaces", "load_space"]
__version__ = "0.1.0"
