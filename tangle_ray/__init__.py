"""tangle_ray: weight-entangled neural architecture search at cluster scale, on Ray and DeepSpeed."""

from tangle_ray.errors import ClusterError, ConfigError, DataError, StorageError, TangleRayError
from tangle_ray.folders import load_supernet, save_supernet
from tangle_ray.models import available_spaces, load_model, load_space
from tangle_ray.space import Arch, SearchSpace
from tangle_ray.supernet import Supernet

__all__ = [
    "Arch", "ClusterError", "ConfigError", "DataError", "SearchSpace", "StorageError", "Supernet", "TangleRayError",
    "available_spaces", "load_model", "load_space", "load_supernet", "save_supernet",
]
__version__ = "0.1.0"
