"""What the registry knows of a model: its family, native resolution and architecture (a leaf
module: the builders and timm's wrapper read it without the registry)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vitexp.models.cnn import stages_stride

# model families: the figures' colours, the claims, and the names [ranges.FAMILY] takes
FAMILIES = ("vit_p", "vit_c", "hybrid", "regnety", "resnet", "cnn", "other")
BUILDER_FAMILIES = ("vit_p", "vit_c", "hybrid", "regnety", "resnet")  # the families vitexp's own builders build


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # one of FAMILIES
    resolution: int  # native input size in px
    kwargs: dict = field(hash=False)  # architecture, passed to the family's builder (or timm.create_model)
    timm: str | None = None  # the timm model it is built as (None: vitexp's builders)
    builtin: bool = False  # one of vitexp's own models (not a preset's or timm's)

    @property
    def is_vit(self) -> bool:
        """Built by vitexp as a torchvision ViT, hybrids included (patch-size rules, position embeddings)."""
        return self.timm is None and self.family in ("vit_p", "vit_c", "hybrid")

    def patch(self, image_size: int | None = None) -> int | None:
        """The pixels one token covers at IMAGE_SIZE (default: native): a ViT's patch, a hybrid's
        CNN stride; None for other models."""
        if not self.is_vit:
            return None
        if self.family != "hybrid":
            return self.kwargs["patch"]
        k = self.kwargs
        return stages_stride(k["layers"], k.get("widths"), k.get("stem_stride", 1), image_size or self.resolution)
