"""One colour per method in every plot of the course (``minipeft.course.figures.METHOD_COLOURS``)."""
from minipeft.core import RECIPES
from minipeft.course.figures import METHOD_COLOURS, method_colour


def test_every_recipe_has_its_own_colour():
    missing = [name for name in RECIPES if name not in METHOD_COLOURS]
    assert not missing, f"recipes without a colour in METHOD_COLOURS (they would all plot in the same grey): {missing}"
    colours = {name: METHOD_COLOURS[name] for name in RECIPES}
    shared = {c: [n for n in colours if colours[n] == c] for c in set(colours.values())}
    assert all(len(names) == 1 for names in shared.values()), \
        f"recipes sharing a colour: {[names for names in shared.values() if len(names) > 1]}"


def test_a_variant_takes_its_method_colour():
    assert method_colour("lora r=8") == METHOD_COLOURS["lora"]
    assert method_colour("prefix flat") == METHOD_COLOURS["prefix flat"] != METHOD_COLOURS["prefix"]
    assert method_colour("no such method") == "#444444"
