"""The model zoo: plain `nn.Module`s, one file per family, each exposing its repeated blocks as `.blocks`."""

from scaleforge.models import cnn, gpt, lstm, mlp, resnet, vit  # noqa: F401  (registration)
