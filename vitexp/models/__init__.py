"""The model zoo: [EC]'s ViT_P / ViT_C / RegNetY models, ResNets, and a small
32 px family, all built from torchvision classes; plus their cost in the papers'
convention (`vitexp models`)."""

from vitexp.models.complexity import complexity, complexity_table, flop_counter
from vitexp.models.registry import (
    FAMILIES,
    ModelSpec,
    build_model,
    classifier,
    features,
    get_spec,
    is_vit,
    list_models,
    unwrap,
)
from vitexp.models.vit import conv_stem_configs, interpolate_pos_embed, resize_pos_embed

__all__ = ["FAMILIES", "ModelSpec", "build_model", "classifier", "complexity", "complexity_table", "flop_counter", "conv_stem_configs", "features",
           "get_spec", "interpolate_pos_embed", "is_vit", "list_models", "resize_pos_embed", "unwrap"]
