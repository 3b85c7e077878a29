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
