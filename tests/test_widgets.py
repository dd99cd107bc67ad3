"""The parameter explorer: formulas vs numel, registry, static fallback."""
import pytest

from minipeft.widgets import (BACKBONES, EXPLORER, ExplorerEntry, breakdown, explore, has_widget_frontend,
                              register_explorer, with_head)


def test_full_and_head_counts():
    full = breakdown("full", 2, "MiniLM-L6")
    assert full["total"] == 22_565_376 + 770 and full["backbone_params"] == 22_565_376
    assert list(full["per_layer"])[:2] == ["embeddings", "layer 0"] and len(full["per_layer"]) == 6 + 2
    assert breakdown("full", 2, "BERT-base")["total"] == 108_891_648 + 1538
    head = breakdown("head", 5, "BERT-base")
    assert head["per_layer"] == {"head": 768 * 5 + 5}
    assert head["pct"] == pytest.approx(100 * 3845 / 108_891_648)


def test_bad_choices_are_explained():
    with pytest.raises(ValueError, match="unknown method 'no_such_method'; in the explorer"):
        breakdown("no_such_method")
    with pytest.raises(ValueError, match="labels C must be one of"):
        breakdown("head", 7)
    with pytest.raises(ValueError, match="unknown backbone"):
        breakdown("head", 2, "gpt2")
    with pytest.raises(ValueError, match="default size"):
        ExplorerEntry("x", "size", (1, 2), 3, lambda cfg, s: {})


def test_a_method_registers_with_one_entry(capsys):
    """The docstring's example: Houlsby adapters, 2L(2md + d + m); m=64 on BERT-base -> 2,379,264 (DESIGN §5)."""
    entry = ExplorerEntry("houlsby-test", "bottleneck m", (8, 64), 64, lambda cfg, m: with_head(cfg, {
        f"layer {i}": 2 * (2 * m * cfg.hidden_size + cfg.hidden_size + m) for i in range(cfg.num_layers)}))
    register_explorer(entry)
    try:
        with pytest.raises(ValueError, match="already in the explorer"):
            register_explorer(entry)
        b = breakdown("houlsby-test", 64, BACKBONES["BERT-base"])
        assert b["total"] - b["per_layer"]["head"] == 2_379_264
        explore("BERT-base", static=True)
        out = capsys.readouterr().out
        assert "| houlsby-test | bottleneck m = 64 | 2,380,802 |" in out and "layer 11" in out
    finally:
        EXPLORER.pop("houlsby-test")


def test_terminal_gets_the_static_printout(capsys):
    assert not has_widget_frontend()
    assert explore() is None
    assert "total" in capsys.readouterr().out
