"""The end-to-end training job: a torchvision-reference ImageNet recipe composing memstrata's data and memory parts.

    cfg = RecipeConfig(root="/data/imagenet", model="resnet50", epochs=90, batch=256)
    summary = train(cfg)          # `memstrata train ROOT --model resnet50 ...`

See config.py for the hyperparameters, loop.py for what is measured and how
--resume stays exact, data.py for the two input pipelines.
"""

from .config import RecipeConfig
from .loop import train

__all__ = ["RecipeConfig", "train"]
