from .models import DiffusionEngine  # noqa: F401
from .util import instantiate_from_config  # noqa: F401
