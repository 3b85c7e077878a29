"""augssl's building blocks for methods: what the built-in plugins are made of, public for any plugin.

The built-in plugins import nothing else of augssl than `framework` and this package (tests/test_plugin_contract.py
checks it), so a third-party plugin can do all they do. The names below are versioned with the plugin API,
`framework.API_VERSION`: a minor version adds names, a major one changes or removes one.

* Views and augmentation presets (`plugins.blocks.augmentations`): `simclr_view` (the SimCLR-style view of a
  preset, `Strength`, `view_spec`) and `simclr_split_view` (the same with its photometric steps able to run on the
  device, its workers' part a `CropFlip`), `TwoViewsConfig` + `crop_views` / `crop_names` / `encode_crops` (two
  views or multi-crop, `MultiCrop`), `crvae_affine_view` (CR-VAE's t(x)), `AffineWithParams` (a warp that returns
  its parameters).
* Photometric augmentation on the device (`plugins.blocks.photometric`): `Photometric` (a view's ColorJitter,
  grayscale, blur, solarisation and normalisation, batched, each sample with its own parameters from an explicit
  generator, `PhotometricParams`) and its per-sample ops `adjust_brightness`, `adjust_contrast`,
  `adjust_saturation`, `adjust_hue`, `rgb_to_grayscale`, `gaussian_blur`, `pil_gaussian_blur`, `solarize`.
* Heads (`plugins.blocks.heads`): `mlp`, the projection / prediction MLP of SimCLR, BYOL, Barlow Twins.
* VAE terms (`plugins.blocks.vae`): likelihoods, `reconstruction_term`, the KLs, `warmup_factor`.
* Losses (`plugins.blocks.losses`): `nt_xent`, `multi_crop_nt_xent`, `barlow_twins_loss`, `byol_loss`,
  `multi_crop_byol_loss`, each over the global batch where the method says so.
* Patch masks (`plugins.blocks.masks`): `block_mask` (BEiT's block-wise masking of a patch grid, `BLOCK_ASPECT`),
  `PatchMasks` (how many images get a mask and how much of each, iBOT's and DINOv2's), `masked_view` / `MaskedView`
  (a view that also returns its image's mask, drawn in the data workers, as `ctx.params[view]`) and `patch_mask`
  (those params as a bool (B, N) mask).
* Self-distillation (`plugins.blocks.distill`): `DINOHead` (DINO's head, its weight-normalised last layer a
  `WeightNormLinear`), `dino_loss`, the teacher's centering `Center` (DINO) and `sinkhorn_knopp` (DINOv2),
  `ibot_patch_loss` (iBOT's masked patches) and `koleo_loss` (DINOv2's KoLeo); `shared_crops` (the crops the
  terms of a recipe share, `Crops`), `mask_spec` and `patch_grid` (how and on what grid its global crops are masked).
* EMA targets (`plugins.blocks.ema`): `Target`, `initialise_targets`, `update_targets`, `ema_update`.
* Capabilities (`plugins.blocks.capabilities`): `AugmentedViews`, `StandsForELBO`, `PriorKLSchedule`, `CropSizes`,
  `PatchGrid`, `SharedCrops`, `MasksGlobalCrops`, typed Protocols a plugin finds with `Recipe.providers`, and
  `VAE_HEAD`, `PATCH_TOKENS`, what a plugin `needs` of the encoder.

Distributed statistics without gradient (`framework.all_reduce`) and with it (`framework.gather_with_grad`)
are the framework's.
"""

from __future__ import annotations

from plugins.blocks.augmentations import (
    AFFINE_COMPONENTS,
    CRVAE_PRESETS,
    IDENTITY_AFFINE,
    LOCAL_SCALE,
    LOCAL_VIEWS,
    VIEW_PRESETS,
    AffineParams,
    AffineWithParams,
    CropFlip,
    CropGroup,
    MultiCrop,
    PILGaussianBlur,
    Strength,
    TwoViewsConfig,
    ViewSpec,
    crop_names,
    crop_views,
    crvae_affine_view,
    encode_crops,
    image_sizes,
    infer_strength,
    simclr_split_view,
    simclr_view,
    two_views,
    view_spec,
)
from plugins.blocks.capabilities import (
    PATCH_TOKENS,
    VAE_HEAD,
    AugmentedViews,
    CropSizes,
    Likelihood,
    MasksGlobalCrops,
    PatchGrid,
    PriorKLSchedule,
    SharedCrops,
    StandsForELBO,
)
from plugins.blocks.distill import (
    Center,
    Crops,
    DINOHead,
    WeightNormLinear,
    dino_loss,
    ibot_patch_loss,
    koleo_loss,
    mask_spec,
    patch_grid,
    shared_crops,
    sinkhorn_knopp,
)
from plugins.blocks.ema import Target, ema_update, initialise_targets, update_targets
from plugins.blocks.heads import mlp
from plugins.blocks.losses import (
    barlow_twins_loss,
    batch_normalise,
    byol_loss,
    multi_crop_byol_loss,
    multi_crop_nt_xent,
    nt_xent,
)
from plugins.blocks.masks import BLOCK_ASPECT, MaskedView, PatchMasks, block_mask, masked_view, patch_mask
from plugins.blocks.photometric import (
    Photometric,
    PhotometricParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    pil_gaussian_blur,
    rgb_to_grayscale,
    solarize,
)
from plugins.blocks.vae import (
    bernoulli_nll,
    gaussian_nll,
    kl_gaussians,
    kl_standard_normal,
    posterior_std,
    reconstruction_nll,
    reconstruction_term,
    warmup_factor,
)

__all__ = [
    "AFFINE_COMPONENTS",
    "AffineParams",
    "AffineWithParams",
    "AugmentedViews",
    "BLOCK_ASPECT",
    "CRVAE_PRESETS",
    "Center",
    "CropFlip",
    "CropGroup",
    "CropSizes",
    "Crops",
    "DINOHead",
    "IDENTITY_AFFINE",
    "LOCAL_SCALE",
    "LOCAL_VIEWS",
    "Likelihood",
    "MaskedView",
    "MasksGlobalCrops",
    "MultiCrop",
    "PATCH_TOKENS",
    "PILGaussianBlur",
    "PatchGrid",
    "PatchMasks",
    "Photometric",
    "PhotometricParams",
    "PriorKLSchedule",
    "SharedCrops",
    "StandsForELBO",
    "Strength",
    "Target",
    "TwoViewsConfig",
    "VAE_HEAD",
    "VIEW_PRESETS",
    "ViewSpec",
    "WeightNormLinear",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "barlow_twins_loss",
    "batch_normalise",
    "bernoulli_nll",
    "block_mask",
    "byol_loss",
    "crop_names",
    "crop_views",
    "crvae_affine_view",
    "dino_loss",
    "ema_update",
    "encode_crops",
    "gaussian_blur",
    "gaussian_nll",
    "ibot_patch_loss",
    "image_sizes",
    "infer_strength",
    "initialise_targets",
    "kl_gaussians",
    "kl_standard_normal",
    "koleo_loss",
    "mask_spec",
    "masked_view",
    "mlp",
    "multi_crop_byol_loss",
    "multi_crop_nt_xent",
    "nt_xent",
    "patch_grid",
    "patch_mask",
    "pil_gaussian_blur",
    "posterior_std",
    "reconstruction_nll",
    "reconstruction_term",
    "rgb_to_grayscale",
    "shared_crops",
    "simclr_split_view",
    "simclr_view",
    "sinkhorn_knopp",
    "solarize",
    "two_views",
    "update_targets",
    "view_spec",
    "warmup_factor",
]
