"""The plugin API stays honest: every hook is documented, tested, and fires in a known order."""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from framework import PluginConfig, View, hookimpl, hookspecs
from framework.checkpoint import complete_checkpoints, model_weights_file
from framework.logging import read_metrics
from framework.testing import CONV28, run_steps, tiny_recipe
from tests.helpers import FrozenHead, assert_only_frozen_kept, final_weights

HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "augssl_spec")]
TESTS = Path(__file__).parent


def test_hookspecs_are_the_designed_hooks():
    assert sorted(HOOKS) == sorted(
        [
            "config_schema",
            "build_modules",
            "shard_blocks",
            "teacher_modules",
            "augment",
            "encode",
            "decode",
            "regularize",
            "auxiliary_head",
            "on_train_start",
            "on_after_backward",
            "on_train_step_end",
        ]
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_in_pytest_shape(hook):
    fn = getattr(hookspecs, hook)
    doc = inspect.getdoc(fn) or ""
    assert "Called" in doc, f"{hook}: docstring must say when it is called"
    assert "Result mode:" in doc, f"{hook}: docstring must give the result mode"
    assert ":returns:" in doc, f"{hook}: docstring must say what it returns"
    for arg in inspect.signature(fn).parameters:
        assert f":param {arg}:" in doc, f"{hook}: argument {arg!r} undocumented"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test_of_its_own(hook):
    sources = "\n".join(p.read_text() for p in TESTS.glob("test_*.py"))
    assert re.search(rf"^def test_hook_{hook}\b", sources, re.M), f"no test named test_hook_{hook} in tests/"


class Recorder:
    """A plugin implementing every hook except encode/decode, recording the order they fire."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def config_schema(self):
        self.calls.append("config_schema")
        return PluginConfig

    @hookimpl
    def build_modules(self, config):
        self.calls.append("build_modules")
        return {"scale": nn.Linear(1, 1)}

    @hookimpl
    def augment(self, config):
        self.calls.append("augment")
        return {}

    @hookimpl
    def regularize(self, modules, ctx):
        self.calls.append("regularize")
        return {"zero": modules["rec"]["scale"].weight.sum() * 0}

    @hookimpl
    def auxiliary_head(self, modules, ctx):
        self.calls.append("auxiliary_head")
        return {}

    @hookimpl
    def on_train_start(self, step):
        self.calls.append(f"on_train_start:{step}")

    @hookimpl
    def on_after_backward(self, step):
        self.calls.append(f"on_after_backward:{step}")

    @hookimpl
    def on_train_step_end(self, modules, step):
        self.calls.append(f"on_train_step_end:{step}")


def test_hooks_fire_in_order(tmp_path, fmnist_shards):
    rec = Recorder()
    run_steps(tiny_recipe(tmp_path, fmnist_shards), steps=2, extra_plugins={"rec": rec})
    assert rec.calls == [
        "config_schema",
        "build_modules",
        "augment",
        "on_train_start:0",
        "regularize",
        "auxiliary_head",
        "on_after_backward:0",
        "on_train_step_end:1",
        "regularize",
        "auxiliary_head",
        "on_after_backward:1",
        "on_train_step_end:2",
    ]


# --- one test per hook -------------------------------------------------------------


class Scaled(PluginConfig):
    factor: float = 2.0


class ConfigPlugin:
    @hookimpl
    def config_schema(self):
        return Scaled

    @hookimpl
    def regularize(self, cfg):
        return {"const": torch.tensor(cfg.factor)}  # `cfg`: this plugin's own validated section


def test_hook_config_schema(tmp_path, fmnist_shards):
    from framework.recipe.loading import RecipeError, apply_overrides
    from framework.startup import validate

    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins={"backbones": CONV28, "kl": {}, "cfgp": {"factor": 3.0}})
    cfg, _ = validate(recipe, extra_plugins={"cfgp": ConfigPlugin()})
    assert isinstance(cfg.plugins["cfgp"], Scaled) and cfg.plugins["cfgp"].factor == 3.0
    with pytest.raises(RecipeError, match=r"plugins\.cfgp\.factr: Extra inputs are not permitted"):
        validate(apply_overrides(recipe, ["plugins.cfgp.factr=1"]), extra_plugins={"cfgp": ConfigPlugin()})
    out = run_steps(recipe, steps=1, extra_plugins={"cfgp": ConfigPlugin()})
    assert read_metrics(out)[-1]["cfgp.const"] == pytest.approx(3.0)


class ModulesPlugin:
    @hookimpl
    def build_modules(self):
        torch.manual_seed(0)
        return {"bias": nn.Linear(4, 1)}

    @hookimpl
    def regularize(self, own, ctx):
        return {"fit": (own["bias"](ctx.encode("x").h[:, :4]) - 5).pow(2).mean()}  # `own`: its modules


def test_hook_build_modules(tmp_path, fmnist_shards):
    from framework.model import Model
    from framework.startup import validate

    recipe = tiny_recipe(tmp_path, fmnist_shards)
    cfg, hooks = validate(recipe, extra_plugins={"modp": ModulesPlugin()})
    model = Model(hooks, cfg)
    assert isinstance(model.plugins["modp"]["bias"], nn.Linear)
    assert any(name.startswith("plugins.modp.bias.") for name in model.state_dict())
    before = model.plugins["modp"]["bias"].weight.detach().clone()
    out = run_steps(recipe, steps=2, overrides=["checkpoint.every=2"], extra_plugins={"modp": ModulesPlugin()})
    from safetensors.torch import load_file

    saved = load_file(out / "checkpoints" / "step_00000002" / "model.safetensors")
    assert not torch.equal(saved["plugins.modp.bias.weight"], before), "the plugin's module must be trained"


class ViewPlugin:
    """A base view returning parameters and a derived view of it."""

    @hookimpl
    def augment(self, config):
        return {"flip": View(FlipWithParam()), "twice": View(Negate(), source="flip")}

    @hookimpl
    def auxiliary_head(self, ctx):
        flip, twice, x = ctx.views["flip"], ctx.views["twice"], ctx.views["x"]
        flipped = ctx.params["flip"][:, 0].bool()
        expect = torch.where(flipped[:, None, None, None], x.flip(-1), x)
        ctx.metrics["match"] = (torch.isclose(flip, expect).all() & torch.equal(twice, -flip)).float()
        return {}


class FlipWithParam:
    def __init__(self) -> None:
        from framework.views import clean_view

        self.clean = clean_view(28, [0.5], [0.25], 1)

    def __call__(self, image):
        t = self.clean(image)
        flip = bool(torch.rand(()) < 0.5)
        return (t.flip(-1) if flip else t), torch.tensor([float(flip)])


class Negate:
    def __call__(self, tensor):
        return -tensor


def test_hook_augment(tmp_path, fmnist_shards):
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards), steps=2, extra_plugins={"viewp": ViewPlugin()})
    assert [r["viewp.match"] for r in read_metrics(out)] == [1.0, 1.0]


class RowMeans(nn.Module):
    """Features = a linear map of the per-row pixel means; declares its width like timm's models."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(28, self.num_features)

    def forward(self, view: torch.Tensor) -> torch.Tensor:
        return self.w(view.mean(dim=(1, 3)))


class MeanEncoder:
    """A third-party encoder replacing `backbones`."""

    @hookimpl
    def build_modules(self):
        return {"encoder": RowMeans()}

    @hookimpl
    def encode(self, own, view):
        from framework import Encoding

        return Encoding(h=own["encoder"](view))

    @hookimpl
    def regularize(self, ctx):
        return {"norm": ctx.encode("x").h.pow(2).mean()}


def test_hook_encode(tmp_path, fmnist_shards):
    from framework.manager import PluginError, PluginHooks

    recipe = tiny_recipe(tmp_path, fmnist_shards, plugins={"enc": {}})
    out = run_steps(recipe, steps=2, extra_plugins={"enc": MeanEncoder()})
    assert "enc.norm" in read_metrics(out)[-1]
    with pytest.raises(PluginError, match=r"hook 'encode': exactly one plugin .* found 2"):
        PluginHooks(["backbones"], extra={"enc": MeanEncoder()})
    with pytest.raises(PluginError, match=r"hook 'encode': exactly one plugin .* found 0"):
        PluginHooks(["kl"])
    # a probe on top is sized by the third-party encoder's num_features, whatever plugin provides it
    probed = tiny_recipe(tmp_path / "probed", fmnist_shards, plugins={"enc": {}, "probe": {}})
    assert "probe.ce" in read_metrics(run_steps(probed, steps=1, extra_plugins={"enc": MeanEncoder()}))[-1]


class Widthless(MeanEncoder):
    @hookimpl
    def build_modules(self):
        return {"encoder": nn.Linear(28, 8)}


def test_the_encoder_must_declare_its_width(tmp_path, fmnist_shards):
    from framework.manager import PluginError
    from framework.model import Model
    from framework.startup import validate

    cfg, hooks = validate(tiny_recipe(tmp_path, fmnist_shards, plugins={"enc": {}}), extra_plugins={"enc": Widthless()})
    with pytest.raises(PluginError, match=r"plugin 'enc', hook 'build_modules': the encoder needs `num_features`"):
        Model(hooks, cfg)


def test_hook_decode(tmp_path, fmnist_shards):
    from framework.manager import PluginError
    from framework.model import Model
    from framework.startup import validate

    cfg, hooks = validate(tiny_recipe(tmp_path, fmnist_shards))
    model = Model(hooks, cfg).eval()
    x = torch.randn(3, 1, 28, 28)
    enc = model.encode(x)
    assert hooks.decode(model.plugins, enc, None, cfg).shape == x.shape
    nodec = tiny_recipe(tmp_path, fmnist_shards, plugins={"backbones": {**CONV28, "decoder": None}, "kl": {}})
    with pytest.raises(PluginError, match=r"plugin 'backbones', hook 'decode'.*no decoder configured"):
        run_steps(nodec, steps=1)


class TermPlugin:
    @hookimpl
    def regularize(self, ctx):
        return {"a": torch.tensor(1.5), "b": torch.tensor(-0.5)}


def test_hook_regularize(tmp_path, fmnist_shards):
    plugins = {"backbones": CONV28, "kl": {"weight": 0.0}, "terms": {"weight": 3.0}}
    out = run_steps(
        tiny_recipe(tmp_path, fmnist_shards, plugins=plugins), steps=1, extra_plugins={"terms": TermPlugin()}
    )
    rec = read_metrics(out)[-1]
    assert rec["terms.a"] == 1.5 and rec["terms.b"] == -0.5
    assert rec["loss"] == pytest.approx(3.0 * (1.5 - 0.5)), "total = sum(weight * term); kl has weight 0"


class ProbeLike:
    @hookimpl
    def build_modules(self, encoder):
        return {"linear": nn.Linear(encoder.num_features, 10)}

    @hookimpl
    def auxiliary_head(self, own, ctx):
        logits = own["linear"](ctx.encode("x").h.detach())
        ctx.metrics["acc"] = (logits.argmax(1) == ctx.labels).float().mean().detach()
        return {"ce": nn.functional.cross_entropy(logits, ctx.labels)}


def test_hook_auxiliary_head(tmp_path, fmnist_shards):
    out = run_steps(tiny_recipe(tmp_path, fmnist_shards), steps=2, extra_plugins={"aux": ProbeLike()})
    rec = read_metrics(out)[-1]
    assert rec["aux.ce"] > 0 and 0 <= rec["aux.acc"] <= 1
    assert rec["loss"] == pytest.approx(rec["kl.recon"] + rec["kl.kl"] + rec["aux.ce"], rel=1e-5)


class StepCounter:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.grad_enabled: list[bool] = []

    @hookimpl
    def on_train_step_end(self, modules, step, config, encoder):
        self.steps.append(step)
        self.grad_enabled.append(torch.is_grad_enabled())
        assert "backbones" in modules and config.train.steps == 3 and encoder.num_features == 256


def test_hook_on_train_step_end(tmp_path, fmnist_shards):
    counter = StepCounter()
    recipe = tiny_recipe(tmp_path, fmnist_shards, distributed={"accumulation_steps": 2})
    run_steps(recipe, steps=3, extra_plugins={"count": counter})
    assert counter.steps == [1, 2, 3], "once per optimizer step, not per accumulation micro-step"
    assert counter.grad_enabled == [False] * 3


class CountedLinear(nn.Linear):
    """A linear layer counting its forward calls (class-wide)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CountedLinear.calls += 1
        return super().forward(x)


class Tower(nn.Module):
    """Three blocks and an output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[CountedLinear(4, 4) for _ in range(3)])
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.blocks(x)))


class BlockLister:
    """A head with a tower of blocks and a frozen copy of it (as an EMA target is), listing the tower's blocks
    (or, with `stray`, a module of its own that is not a submodule); counts the tower's blocks' forward calls."""

    def __init__(self, stray: bool = False) -> None:
        self.listed, self.stray, self.own = 0, stray, nn.ModuleDict()

    @hookimpl
    def build_modules(self):
        tower = Tower()
        return {"tower": tower, "frozen": copy.deepcopy(tower).requires_grad_(False)}

    @property
    def calls(self) -> int:
        return CountedLinear.calls

    @hookimpl
    def shard_blocks(self, own):
        self.own, self.listed = own, self.listed + 1
        return [nn.Linear(1, 1)] if self.stray else list(own["tower"].blocks)

    @hookimpl
    def auxiliary_head(self, own, ctx):
        h = ctx.encode("x").h.detach()[:, :4]
        return {"loss": own["tower"](h).pow(2).mean() + 0 * own["frozen"](h).sum()}


def test_hook_shard_blocks(tmp_path, fmnist_shards, monkeypatch):
    """The blocks a plugin lists: never asked for by a plain run; recomputed in backward under activation
    checkpointing; under FSDP2 (one process) each an FSDP2 unit, and so are the same blocks of the frozen copy.
    Neither changes a weight. A module that is not the plugin's own is one line."""
    from torch.distributed.fsdp import FSDPModule

    from framework.distributed import FSDP_LAUNCHED
    from framework.manager import PluginError

    def train(name: str, **sections) -> tuple[BlockLister, dict[str, torch.Tensor]]:
        plugin, CountedLinear.calls = BlockLister(), 0
        recipe = tiny_recipe(tmp_path / name, fmnist_shards, **sections)
        out = run_steps(recipe, steps=2, extra_plugins={"tower": plugin})
        return plugin, final_weights(out)

    plain, plain_weights = train("plain")
    assert plain.listed == 0 and plain.calls == 12  # 3 blocks of the tower and 3 of the copy, once per step
    checkpointed, weights = train("checkpointed", distributed={"activation_checkpointing": True})
    assert checkpointed.listed == 1 and checkpointed.calls == 18, (
        "the tower's blocks again in backward (not the copy's)"
    )
    assert all(torch.equal(weights[k], plain_weights[k]) for k in plain_weights)

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp --fsdp_version 2` sets
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv(FSDP_LAUNCHED, "false")  # restored after the test: the run sets it
    sharded, weights = train("fsdp")
    assert sharded.listed == 1 and sharded.calls == 12
    for holder in (sharded.own["tower"], sharded.own["frozen"]):
        assert all(isinstance(block, FSDPModule) for block in holder.blocks), "the copy's blocks too"
        assert isinstance(holder, FSDPModule) and not isinstance(holder.out, FSDPModule)
    assert all(torch.allclose(weights[k], plain_weights[k], atol=1e-6) for k in plain_weights)
    assert not torch.distributed.is_initialized(), "the one-rank group is left at the end"

    recipe = tiny_recipe(tmp_path / "stray", fmnist_shards)
    with pytest.raises(PluginError, match=r"plugin 'tower', hook 'shard_blocks': item 0 \(Linear\) is not a submodule"):
        run_steps(recipe, extra_plugins={"tower": BlockLister(stray=True)})
    assert not (tmp_path / "stray" / "run").exists()


class Mirrored:
    """Asks for the teacher with its `head` mirrored; records what its forward sees of the teacher."""

    def __init__(self, names: list | None = None) -> None:
        self.names = ["head"] if names is None else names
        self.seen: list[dict] = []

    @hookimpl
    def build_modules(self, encoder):
        return {"head": nn.Linear(encoder.num_features, 4), "other": nn.Linear(2, 2)}

    @hookimpl
    def teacher_modules(self):
        return self.names

    @hookimpl
    def regularize(self, ctx, own):
        teacher = ctx.encode_teacher("x")
        out = ctx.teacher["head"](teacher.h)
        self.seen.append(
            {
                "same": ctx.encode_teacher("x") is teacher,  # cached
                "grad": teacher.h.requires_grad or out.requires_grad,
                "head": ctx.teacher["head"].weight.detach().clone(),
                "keys": sorted(ctx.teacher),
            }
        )
        return {"loss": own["head"](ctx.encode("x").h).pow(2).mean() + 0 * own["other"].weight.sum()}


def test_hook_teacher_modules(tmp_path, fmnist_shards):
    """A plugin asking for the teacher gets, in its step, the teacher's copy of its named modules (`ctx.teacher`)
    and the teacher's encodings (no gradient, cached); the teacher starts as the online weights and follows
    `xi <- m xi + (1 - m) theta` after each step, m the recipe's `teacher.momentum`; it is checkpointed as
    `teacher.plugins.<plugin>.<module>`. A run whose plugins ask for none has no teacher; a name that is not
    one of the plugin's own modules is one line."""
    from framework.manager import PluginError

    plugin = Mirrored()
    out = run_steps(
        tiny_recipe(tmp_path / "m", fmnist_shards, teacher={"momentum": 0.5}, checkpoint={"every": 1}),
        steps=2,
        extra_plugins={"mirror": plugin},
    )
    assert [s["keys"] for s in plugin.seen] == [["head"], ["head"]] and all(s["same"] for s in plugin.seen)
    assert not any(s["grad"] for s in plugin.seen)
    weights = [load_file(str(model_weights_file(c))) for c in complete_checkpoints(out)]
    online, copy_ = "plugins.mirror.head.weight", "teacher.plugins.mirror.head.weight"
    assert "teacher.plugins.mirror.other.weight" not in weights[0]
    assert "teacher.plugins.backbones.encoder.0.weight" in weights[0]  # the encoder's copy, under its plugin
    # step 1's forward saw the online weights (a fresh run's teacher is initialised before it)
    assert not torch.equal(plugin.seen[0]["head"], weights[0][online])  # the online head moved at step 1
    first = plugin.seen[0]["head"]
    assert torch.equal(weights[0][copy_], 0.5 * first + 0.5 * weights[0][online])
    assert torch.equal(plugin.seen[1]["head"], weights[0][copy_])  # step 2's forward saw the updated copy
    assert torch.equal(weights[1][copy_], 0.5 * weights[0][copy_] + 0.5 * weights[1][online])
    assert [r["teacher.momentum"] for r in read_metrics(out)] == [0.5, 0.5]

    plain = run_steps(tiny_recipe(tmp_path / "plain", fmnist_shards), steps=1)
    assert not any(k.startswith("teacher.") for k in final_weights(plain))
    assert "teacher.momentum" not in read_metrics(plain)[0]

    with pytest.raises(PluginError, match=r"^plugin 'mirror', hook 'teacher_modules': 'nope' is not one of its own"):
        run_steps(tiny_recipe(tmp_path / "bad", fmnist_shards), extra_plugins={"mirror": Mirrored(["nope"])})
    assert not (tmp_path / "bad" / "run").exists()


class StartWatcher:
    """Records the step and a weight of the encoder that `on_train_start` sees."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, dict[str, torch.Tensor], bool]] = []

    @hookimpl
    def on_train_start(self, step, config, encoder):
        weights = {k: v.clone() for k, v in encoder.state_dict().items() if v.is_floating_point()}
        self.seen.append((step, weights, torch.is_grad_enabled()))
        assert config.train.steps == 3


def test_hook_on_train_start(tmp_path, fmnist_shards):
    from safetensors.torch import load_file

    recipe, first, resumed = tiny_recipe(tmp_path, fmnist_shards), StartWatcher(), StartWatcher()
    out = run_steps(recipe, steps=3, overrides=["checkpoint.every=2"], extra_plugins={"w": first})
    (tmp_path / "run" / "checkpoints" / "step_00000003").rename(tmp_path / "dropped")  # stop after step 2
    saved = load_file(out / "checkpoints" / "step_00000002" / "model.safetensors")
    run_steps(recipe, steps=3, extra_plugins={"w": resumed})
    assert [step for step, _, _ in first.seen] == [0] and [step for step, _, _ in resumed.seen] == [2]
    for key, weight in resumed.seen[0][1].items():
        assert torch.equal(weight, saved[f"plugins.backbones.encoder.{key}"]), f"{key}: not the resumed weights"
    assert any(not torch.equal(w, resumed.seen[0][1][k]) for k, w in first.seen[0][1].items())
    assert not first.seen[0][2] and not resumed.seen[0][2], "outside autograd"


def test_hook_on_after_backward(tmp_path, fmnist_shards):
    plugin = FrozenHead()
    recipe = tiny_recipe(tmp_path, fmnist_shards, distributed={"accumulation_steps": 2, "grad_clip": 1e-3})
    out = run_steps(recipe, steps=2, extra_plugins={"fr": plugin})
    assert [step for step, _, _ in plugin.log] == [0, 1], "once per optimizer step, not per micro-step"
    assert all(norm > 1e-3 for _, norm, _ in plugin.log), "the gradients before distributed.grad_clip"
    assert not any(enabled for _, _, enabled in plugin.log)
    assert_only_frozen_kept(final_weights(out), "fr", plugin.start)


def test_on_after_backward_is_refused_under_deepspeed(tmp_path, fmnist_shards, monkeypatch, capsys):
    from framework.cli import train_or_exit
    from framework.manager import PluginError
    from framework.startup import validate

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch --use_deepspeed` sets
    recipe = tiny_recipe(tmp_path, fmnist_shards)
    with pytest.raises(PluginError, match=r"plugin 'fr', hook 'on_after_backward': not supported under DeepSpeed"):
        run_steps(recipe, extra_plugins={"fr": FrozenHead()})
    with pytest.raises(SystemExit) as exit_:
        train_or_exit(*validate(recipe, extra_plugins={"fr": FrozenHead()}))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "'on_after_backward': not supported under" in lines[0]
    assert not (tmp_path / "run").exists(), "refused before anything starts"


def test_the_teacher_has_no_dropout_and_no_stochastic_depth():
    """DINO, iBOT and DINOv2 build their teacher without drop-path; augssl's copies the student, so its copy's
    stochastic layers are switched off (it runs in train mode, for BYOL's BatchNorm), and the student's are not."""
    import timm

    from framework.teacher import Teacher

    student = timm.create_model("vit_tiny_patch16_224", num_classes=0, drop_path_rate=0.2, img_size=16, patch_size=4)
    head = nn.Sequential(nn.Linear(192, 8), nn.Dropout(0.5))
    teacher = Teacher({"backbones": {"encoder": student}, "probe": {"head": head}}).train()
    copies = [m for m in teacher.modules() if hasattr(m, "drop_prob") or isinstance(m, nn.Dropout)]
    assert len(copies) > 3 and all(getattr(m, "drop_prob", 0.0) == 0.0 and getattr(m, "p", 0.0) == 0.0 for m in copies)
    assert student.blocks[-1].drop_path1.drop_prob > 0 and head[1].p == 0.5
    x = torch.randn(4, 3, 16, 16)
    encoder = teacher.plugins["backbones"]["encoder"]
    assert torch.equal(encoder(x), encoder(x)), "deterministic in train mode"
