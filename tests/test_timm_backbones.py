"""timm encoders in the `backbones` plugin (`encoder: timm/<name>`): built without a classifier, their
width from the model, the VAE head and decoders on their pooled features, local pretrained files only,
bf16 autocast, and `augssl export` files that timm itself loads back."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from framework.checkpoint import load_run, tensors_digest
from framework.cli import main
from framework.logging import read_metrics
from framework.recipe.loading import RecipeError
from framework.startup import validate
from framework.testing import run_steps, tiny_recipe, write_recipe
from plugins.backbones import BackbonesConfig, build_encoder, check_input_sizes
from plugins.blocks import image_sizes
from tests.helpers import ENV, ONE_NODE, ROOT, accelerate_launch, one_line

VIT = "timm/vit_tiny_patch16_224"  # 5.5 M parameters: the smallest ViT timm names


@pytest.mark.parametrize(
    "name, channels, size",
    [(VIT, 3, 32), (VIT, 1, 48), ("timm/resnet18", 1, 28), ("timm/convnext_atto", 3, 32), ("timm/resnet50", 3, 32)],
)
def test_timm_encoders_pool_features_of_their_own_width(name, channels, size):
    encoder = build_encoder(BackbonesConfig(encoder=name), channels, size).eval()
    assert not hasattr(encoder, "fc") or isinstance(encoder.fc, torch.nn.Identity)  # no classifier
    with torch.no_grad():
        h = encoder(torch.randn(2, channels, size, size))
    reference = timm.create_model(name.removeprefix("timm/"), num_classes=0)  # the model's own width
    assert h.shape == (2, encoder.num_features) and encoder.num_features == reference.num_features
    meta = encoder.export_metadata
    assert (meta["key_names"], meta["timm_model"], meta["timm_kwargs"]["in_chans"]) == ("timm", name[5:], channels)
    if "vit" in name:  # the patch grid follows the data's image size unless the recipe sets img_size
        assert encoder.patch_embed.img_size == (size, size) and meta["timm_kwargs"]["img_size"] == size


def test_timm_options_reach_create_model_and_img_size_overrides_the_data():
    cfg = BackbonesConfig(encoder=VIT, img_size=64, timm_kwargs={"drop_path_rate": 0.1, "patch_size": 8})
    encoder = build_encoder(cfg, 3, 32)
    assert encoder.patch_embed.img_size == (64, 64) and encoder.patch_embed.patch_size == (8, 8)
    assert encoder.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


@pytest.mark.parametrize(
    "backbone, message",
    [
        ({"encoder": "timm/not_a_model"}, "plugins.backbones.encoder: .*timm [0-9.]+ has no model 'not_a_model'"),
        ({"encoder": "vgg11"}, "plugins.backbones.encoder: .*expected one of resnet18, resnet50, conv28 or timm/"),
        ({"encoder": "resnet18", "timm_kwargs": {"drop_rate": 0.1}}, "apply to timm/ encoders, not resnet18"),
    ],
)
def test_a_bad_timm_section_is_one_line_naming_the_key(tmp_path, backbone, message):
    recipe = tiny_recipe(tmp_path, {"train": "x.tar", "test": "x.tar"}, plugins={"backbones": backbone})
    with pytest.raises(RecipeError, match=message) as err:
        validate(recipe)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs", [{"img_size": 32}, {"drop_rate_typo": 0.1}])
def test_timm_refusing_an_option_is_one_line_at_build(kwargs):
    """A keyword the model's constructor does not take: `img_size` set on a CNN, and any unknown one (that was a
    TypeError's traceback: timm's first refusal, of the data's img_size, hid it)."""
    cfg = BackbonesConfig(encoder="timm/resnet18", timm_kwargs=kwargs)
    with pytest.raises(
        ValueError, match=rf"^plugins.backbones.timm_kwargs: timm/resnet18 refuses \[.*'{next(iter(kwargs))}'"
    ):
        build_encoder(cfg, 3, 32)


def test_pretrained_is_a_local_file_and_nothing_else(tmp_path):
    source = build_encoder(BackbonesConfig(encoder=VIT), 3, 32)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = build_encoder(BackbonesConfig(encoder=VIT, pretrained=str(tmp_path / "w.safetensors")), 3, 32)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="plugins.backbones.pretrained: no file"):
        build_encoder(BackbonesConfig(encoder=VIT, pretrained=str(tmp_path / "missing.safetensors")), 3, 32)


@pytest.mark.parametrize("encoder", ["conv28", "timm/resnet18"])
def test_a_pretrained_file_that_holds_no_state_dict_is_one_line(tmp_path, encoder):
    """Neither safetensors nor a torch file of tensors: safetensors', pickle's or timm's own error was a traceback."""
    (tmp_path / "text.safetensors").write_text("not safetensors")
    (tmp_path / "text.pth").write_text("not a torch file")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    for name, why in (("text.safetensors", "SafetensorError"), ("text.pth", ""), ("tensor.pth", "")):
        path = tmp_path / name
        with pytest.raises(ValueError, match=f"^plugins.backbones.pretrained: {path} is not a weights file .*{why}"):
            build_encoder(BackbonesConfig(encoder=encoder, pretrained=str(path)), 1, 28)


def test_a_stock_timm_checkpoint_with_its_classifier_loads_and_a_misfit_is_one_line(tmp_path):
    stock = timm.create_model("vit_tiny_patch16_224", num_classes=1000, img_size=32)  # as timm's hub files hold it
    torch.save(stock.state_dict(), tmp_path / "stock.pth")
    loaded = build_encoder(BackbonesConfig(encoder=VIT, pretrained=str(tmp_path / "stock.pth")), 3, 32)
    for key, value in loaded.state_dict().items():  # every tensor of the encoder is the file's; the head is dropped
        torch.testing.assert_close(value, stock.state_dict()[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"pretrained: .*stock.pth does not fit timm/resnet18: ") as err:
        build_encoder(BackbonesConfig(encoder="timm/resnet18", pretrained=str(tmp_path / "stock.pth")), 3, 32)
    assert "\n" not in str(err.value)


def test_a_built_in_encoder_loads_its_pretrained_file_strictly(tmp_path):
    resnet = build_encoder(BackbonesConfig(encoder="resnet18"), 3, 32)
    torch.save(resnet.state_dict(), tmp_path / "r.pt")
    again = build_encoder(BackbonesConfig(encoder="resnet18", pretrained=str(tmp_path / "r.pt")), 3, 32)
    torch.testing.assert_close(again.conv1.weight, resnet.conv1.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit the encoder: Error"):
        build_encoder(BackbonesConfig(encoder="resnet50", pretrained=str(tmp_path / "r.pt")), 3, 32)


@pytest.fixture(scope="module")
def vit_shards(tmp_path_factory):
    from framework.testing import tiny_shards

    return tiny_shards(tmp_path_factory.mktemp("vit"), n_train=32, n_test=16, size=32, channels=3)


@pytest.mark.slow
def test_aavae_with_a_vit_encoder_trains_under_the_launchs_bf16(tmp_path, vit_shards):
    """AAVAE with the VAE head and the ResNet decoder on the ViT's pooled features, launched with
    `--mixed_precision bf16`: the ViT's matmuls run in bf16 (its pooled h leaves a float32 LayerNorm)."""
    plugins = {"backbones": {"encoder": VIT, "latent_dim": 16, "decoder": "resnet18"}, "aavae": {}}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, vit_shards, plugins=plugins, size=32, channels=3))
    args = ["--num_processes", "1", *ONE_NODE[:2], "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    proc = accelerate_launch(args, [str(recipe), "train.steps=2"], env={"AUGSSL_TEST_AUTOCAST": str(tmp_path / "ac")})
    assert "precision bf16" in proc.stdout
    seen = json.loads((tmp_path / "ac.rank0").read_text())
    assert seen == {"enabled": True, "h": "torch.float32", "dtype": "torch.bfloat16", "first_linear": "torch.bfloat16"}
    records = read_metrics(tmp_path / "run")
    assert records[-1]["step"] == 2 and all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.slow
def test_a_vit_run_exports_a_file_timm_loads_with_the_same_features(tmp_path, vit_shards, capsys):
    """SimCLR with a ViT; the exported file loads into `timm.create_model` both ways (the issue's
    `pretrained_cfg_overlay=dict(file=...)`, the model card's strict one) and gives the run's features."""
    plugins = {"backbones": {"encoder": VIT, "latent_dim": None}, "simclr": {}}
    out = run_steps(tiny_recipe(tmp_path, vit_shards, plugins=plugins, size=32, channels=3), steps=2)
    model, _, _ = load_run(out)
    measured = {"encoder_blake2b": tensors_digest(model.encoder.state_dict())}  # an eval of this very encoder
    (out / "eval.json").write_text(
        json.dumps({"protocol": {"fast": "L-BFGS"}, "accuracies": {"fast": 0.25}, **measured})
    )
    weights = tmp_path / "export" / "vit.safetensors"
    capsys.readouterr()
    main(["export", str(out), "--out", str(weights)])
    meta = json.loads(capsys.readouterr().out)
    assert (meta["arch"], meta["key_names"], meta["num_features"]) == (VIT, "timm", "192")
    kwargs = json.loads(meta["timm_kwargs"])
    assert kwargs == {"in_chans": 3, "img_size": 32}
    card = weights.with_suffix(".md").read_text()
    assert "library_name: timm" in card and '"simclr"' in card and "- steps: 2 " in card
    assert '(`augssl eval`, fast): {"fast": 0.25}' in card and "img_size=32" in card

    file_keys = set(load_file(str(weights)))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model.encode(x).h
    for overlay in ({"file": str(weights)}, {"file": str(weights), "num_classes": 0}):
        net = timm.create_model(
            "vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs
        ).eval()
        assert set(net.state_dict()) == file_keys  # every key of the model came from the file, none left over
        with torch.no_grad():
            torch.testing.assert_close(net(x), want)
    with safe_open(str(weights), "pt") as f:
        assert f.metadata()["image_size"] == "32"


def test_a_vit_refuses_image_sizes_it_cannot_take_naming_the_fix():
    """Without `dynamic_img_size` a ViT takes its `img_size` only (timm would assert at the first step); with it,
    multiples of its patch. CNNs take any size."""
    fixed = build_encoder(BackbonesConfig(encoder=VIT), 3, 32)
    check_input_sizes(fixed, VIT, [32])
    with pytest.raises(ValueError, match=r"takes 32 px images only .* also \[16\] px .*dynamic_img_size: true"):
        check_input_sizes(fixed, VIT, [16, 32])
    dynamic = build_encoder(BackbonesConfig(encoder=VIT, timm_kwargs={"dynamic_img_size": True}), 3, 32)
    check_input_sizes(dynamic, VIT, [16, 32])
    with pytest.raises(ValueError, match=r"multiples of its 16 px patch, got \[20\] px"):
        check_input_sizes(dynamic, VIT, [20, 32])
    padded = build_encoder(
        BackbonesConfig(encoder=VIT, timm_kwargs={"dynamic_img_size": True, "dynamic_img_pad": True}), 3, 32
    )
    check_input_sizes(padded, VIT, [20, 32])
    check_input_sizes(build_encoder(BackbonesConfig(encoder="timm/resnet18"), 3, 32), "timm/resnet18", [20, 32])


def test_multi_crop_sizes_are_every_plugins_crops_and_the_data_size(tmp_path, vit_shards):
    crops = {"global": {"count": 2, "size": 24}, "local": {"count": 3, "size": 12}}
    plugins = {"backbones": {"encoder": VIT, "latent_dim": None}, "simclr": {"crops": crops}, "byol": {}}
    recipe, _ = validate(tiny_recipe(tmp_path, vit_shards, plugins=plugins, size=32, channels=3))
    assert image_sizes(recipe) == [12, 24, 32]


@pytest.mark.slow
def test_a_vit_multi_crop_recipe_without_dynamic_img_size_is_one_line_and_trains_once_fixed(tmp_path, vit_shards):
    """The attack: multi-crop's local crops on a fixed-size ViT. One line before any step (not timm's assertion
    and its traceback at step 1); the same output_dir then trains once the recipe sets the fix."""
    crops = {"global": {"count": 2}, "local": {"count": 2, "size": 16}}
    plugins = {"backbones": {"encoder": VIT, "latent_dim": None}, "simclr": {"crops": crops}}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path, vit_shards, plugins=plugins, size=32, channels=3))
    line = one_line([recipe])
    assert "timm/vit_tiny_patch16_224 takes 32 px images only" in line and "dynamic_img_size: true" in line
    fixed = [str(recipe), "plugins.backbones.timm_kwargs={dynamic_img_size: true}"]
    subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), *fixed], check=True, env=ENV, timeout=300)
    assert read_metrics(tmp_path / "run")[-1]["step"] == 2
