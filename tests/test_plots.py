"""`augssl plot`: a PNG of the loss terms and the probe's accuracy from a real run's metrics.jsonl."""

from __future__ import annotations

import pytest
from PIL import Image

from framework.cli import main
from framework.testing import CONV28, run_steps, tiny_recipe


def test_plot_a_run_with_a_probe(tmp_path, fmnist_shards, capsys):
    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins={"backbones": CONV28, "kl": {}, "probe": {}})
    out = run_steps(recipe, steps=3)
    main(["plot", str(out)])
    png = out / "metrics.png"
    assert str(png) in capsys.readouterr().out
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1200, 450)  # two panels: losses and accuracy


def test_plot_without_metrics_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(tmp_path)])
    assert exc.value.code == 2 and "no records" in capsys.readouterr().err


def test_every_preview_step_saves_a_grid_of_views_and_reconstructions(tmp_path, fmnist_shards, monkeypatch):
    import framework.plots

    saved = {}
    real = framework.plots.save_preview

    def spy(path, rows, mean, std, n=8):
        saved[path.name] = {name: batch.shape for name, batch in rows.items()}
        return real(path, rows, mean, std, n)

    monkeypatch.setattr(framework.plots, "save_preview", spy)
    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins={"backbones": CONV28, "aavae": {}}, log={"preview_every": 2})
    out = run_steps(recipe, steps=4)
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step_00000002.png", "step_00000004.png"]
    rows = saved["step_00000004.png"]
    assert list(rows) == ["x", "aavae.aug", "aavae.recon"], "originals, the augmented view, the reconstruction"
    assert rows["aavae.recon"] == rows["x"] == (8, 1, 28, 28)
    with Image.open(out / "previews" / "step_00000004.png") as image:
        assert image.format == "PNG" and image.size[0] > image.size[1]  # 8 columns, 3 rows


def test_bernoulli_reconstructions_are_previewed_in_the_views_space(tmp_path, fmnist_shards):
    import torch

    from framework.model import Model
    from framework.startup import validate

    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins={"backbones": CONV28, "kl": {"likelihood": "bernoulli"}})
    cfg, hooks = validate(recipe, check_data=False)
    model = Model(hooks, cfg).eval()
    views = {"x": torch.randn(4, 1, 28, 28)}
    model(views, {}, None, preview=False)
    assert model.preview_images == {}, "nothing is kept off preview steps"
    model(views, {}, None, preview=True)
    shown = model.preview_images["kl.recon"] * 0.25 + 0.5  # back to [0, 1] with the tiny recipe's mean/std
    assert shown.shape == (4, 1, 28, 28) and shown.min() >= 0 and shown.max() <= 1
