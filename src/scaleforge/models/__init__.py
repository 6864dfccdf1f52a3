"""The model zoo: plain `nn.Module`s, one file per family, each exposing its repeated blocks as `.blocks`."""

from scaleforge.models import mlp  # noqa: F401  (registration)
from scaleforge.models import gpt, lstm  # noqa: F401  (registration)
