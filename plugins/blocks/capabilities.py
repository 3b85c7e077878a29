"""The capabilities the built-in plugins offer each other: typed Protocols a section class implements, found
with `Recipe.providers(Protocol)` (or `isinstance(section, Protocol)`); `framework.capability` checks each
declaration when the recipe is validated."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, runtime_checkable

from framework import capability

if TYPE_CHECKING:
    from plugins.blocks.masks import PatchMasks

Likelihood = Literal["gaussian", "bernoulli"]

# What autoencoding plugins ask of the encoder's plugin (`PluginConfig.needs`): a VAE head, encodings with mu,
# logvar, z (the `backbones` plugin builds one when a plugin of the recipe needs it).
VAE_HEAD = "vae_head"
# What token-level plugins (iBOT) ask of the encoder: encodings with `patches` (B, N, D) and a learned mask token
# that replaces the patches a view's mask marks (the `backbones` plugin gives them for timm's ViTs).
PATCH_TOKENS = "patch_tokens"


def _short_view_name(section: type) -> str | None:
    view = getattr(section, "augmented_view", None)
    if isinstance(view, str) and (not (view.isascii() and view.isidentifier()) or view == "x"):
        return (
            f"augmented_view {view!r} must be the short name of one of the plugin's own views, as its "
            "`augment` returns it (e.g. 'v1', not '<plugin>.v1' or 'x')"
        )
    return None


@capability(_short_view_name)
@runtime_checkable
class AugmentedViews(Protocol):
    """The plugin makes augmented views of each image; `augmented_view` (a `ClassVar[str]` of the section class)
    is the short name of the first, e.g. "v1" for the view `<plugin>.v1` (the affine head's default x1)."""

    augmented_view: ClassVar[str]


@capability()
@runtime_checkable
class StandsForELBO(Protocol):
    """The plugin's terms stand for L_vae(x), the reconstruction of the clean view `x` (a VAE's ELBO, AAVAE's
    reconstruction), under the likelihood `elbo_likelihood()` returns (CR-VAE adds L_vae(x) only without one)."""

    def elbo_likelihood(self) -> Likelihood: ...


@capability()
@runtime_checkable
class CropSizes(Protocol):
    """The plugin's views come in sizes other than `data.image_size` (multi-crop): `crop_sizes(image_size)`
    lists them, so the encoder's plugin can check it takes every one (a ViT's patch grid)."""

    def crop_sizes(self, image_size: int) -> list[int]: ...


@capability()
@runtime_checkable
class PriorKLSchedule(Protocol):
    """The plugin's prior KL follows a schedule, `kl_factor(step)` in 0..1 after `step` optimizer steps (the KL
    warm-up / cycles of `kl`); the recipe's other prior KLs follow it (CR-VAE's)."""

    def kl_factor(self, step: int) -> float: ...


@capability()
@runtime_checkable
class PatchGrid(Protocol):
    """The encoder's plugin: `patch_size()`, the side in pixels of the patches of its token-level encodings (a
    ViT's patch), None when it has none; a view of `s` px then has `(s // patch_size) ** 2` patches, the length
    of its masks (`plugins.blocks.masked_view`)."""

    def patch_size(self) -> int | None: ...


@capability()
@runtime_checkable
class SharedCrops(Protocol):
    """The plugin makes the multi-crop views that self-distillation terms share (DINO's): `crop_names()` gives the
    short names of its global and of its local crops; other terms of the recipe (iBOT, KoLeo) read the student's
    and the teacher's encodings of the same crops (`plugins.blocks.shared_crops`)."""

    def crop_names(self) -> tuple[list[str], list[str]]: ...


@capability()
@runtime_checkable
class MasksGlobalCrops(Protocol):
    """The plugin's term needs the global crops masked (iBOT's): `patch_masks()` says how (`PatchMasks`); the
    `SharedCrops` plugin then draws a mask with each global crop and the student encodes them masked."""

    def patch_masks(self) -> PatchMasks: ...
