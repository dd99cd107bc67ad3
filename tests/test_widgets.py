"""The parameter explorer: derived from the recipes, counts = numel of what trains, static fallback."""
import pytest

from minipeft.core import RECIPES, Knob, Recipe, register_recipe
from minipeft.methods.bottleneck import BottleneckConfig, houlsby_count
from minipeft.methods.compacter import compacter_count
from minipeft.methods.fusion import fusion_count
from minipeft.methods.lora import lora_count_encoder
from minipeft.methods.parallel import parallel_count
from minipeft.methods.prefix import prefix_training_count
from minipeft.course.widgets import BACKBONES, breakdown, explore, has_widget_frontend


def test_full_and_head_counts():
    full = breakdown("full", None, "MiniLM-L6")
    assert full["total"] == 22_565_376 + 770 and full["backbone_params"] == 22_565_376
    assert list(full["per_layer"])[:2] == ["embeddings", "layer 0"] and len(full["per_layer"]) == 6 + 2
    assert breakdown("full", None, "BERT-base")["total"] == 108_891_648 + 1538
    head = breakdown("head", None, "BERT-base", num_labels=5)
    assert head["per_layer"] == {"head": 768 * 5 + 5}
    assert head["pct"] == pytest.approx(100 * 3845 / 108_891_648)


@pytest.mark.parametrize("backbone", ["MiniLM-L6", "BERT-base"])
def test_every_recipe_matches_its_closed_form(backbone):
    """The explorer counts numel on a meta-device model; each method's closed form must agree (+ the head)."""
    cfg = BACKBONES[backbone]
    d, L, head = cfg.hidden_size, cfg.num_layers, cfg.hidden_size * 2 + 2
    expected = {"houlsby": houlsby_count(d, L, 32), "pfeiffer": houlsby_count(d, L, 64) // 2,
                "lora": lora_count_encoder(cfg, 8), "compacter": compacter_count(d, L, 24),
                "compacter_pp": compacter_count(d, L, 24, sites=1), "parallel": parallel_count(d, L, 96),
                "scaled_parallel": parallel_count(d, L, 96), "prefix": prefix_training_count(d, L, 30, 512),
                "fusion": fusion_count(d, L)}  # the sources are frozen: only the fusion and the head train
    for method, count in expected.items():
        assert breakdown(method, None, backbone)["total"] == count + head, method


def test_bad_choices_are_explained():
    with pytest.raises(ValueError, match="unknown method 'no_such_method'; in the explorer"):
        breakdown("no_such_method")
    with pytest.raises(ValueError, match="rank r must be one of"):
        breakdown("lora", 7)
    with pytest.raises(ValueError, match="has no size to choose"):
        breakdown("head", 7)
    with pytest.raises(ValueError, match="unknown backbone"):
        breakdown("head", None, "gpt2")
    with pytest.raises(ValueError, match="default size"):
        Knob("size", (1, 2), 3)


def test_a_method_registers_with_one_recipe(capsys):
    """A recipe is all the explorer needs: Houlsby m=64 on BERT-base -> 2,379,264 (DESIGN §5)."""
    recipe = Recipe.adapter("houlsby_test", lesson="01", lr=1e-3,
                            make=lambda m: BottleneckConfig(placement="houlsby", bottleneck=m),
                            knob=Knob("bottleneck m", (8, 64), 64))
    register_recipe(recipe)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_recipe(recipe)
        b = breakdown("houlsby_test", 64, "BERT-base")
        assert b["total"] - b["per_layer"]["head"] == 2_379_264
        explore("BERT-base", static=True)
        out = capsys.readouterr().out
        assert "| houlsby_test | bottleneck m = 64 | 2,380,802 |" in out and "layer 11" in out
    finally:
        RECIPES.pop("houlsby_test")


def test_terminal_gets_the_static_printout(capsys):
    assert not has_widget_frontend()
    assert explore() is None
    assert "total" in capsys.readouterr().out
