"""The README's key tables say what the declarations say: every declared key (training/config_schema.py's Run,
Wandb, Lora and Model, each loss's fields in losses.py) is in its table with its declared default, and
the tables name no key that is not declared. The YAML files are written from the same declarations
(test_train.py checks them); the README keeps its own, longer explanations, so it is checked instead."""

import dataclasses
import re

import pytest

from training import config_schema
import losses
from training.options import default_of
from utils import REPO_DIR

README = (REPO_DIR / "README.md").read_text(encoding="utf-8")


pytestmark = pytest.mark.unit


def section(heading):
    """The README text under `heading` (a whole heading line), up to the next heading of its level or above."""
    level = heading.split()[0]
    start = README.index("\n" + heading + "\n")
    end = re.search(rf"\n#{{1,{len(level)}}} ", README[start + 1:])
    return README[start:start + 1 + end.start()] if end else README[start:]


def table(text):
    """{key: default cell} of the table rows whose first cell names keys in backticks (`a`, `b` share a row
    whose default cell lists theirs in order, comma-separated)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        keys = re.findall(r"`([^`]+)`", cells[0]) if line.startswith("| `") else []
        if not keys:
            continue
        defaults = [cells[1]] if len(keys) == 1 else [d.strip() for d in cells[1].split(",")]
        rows.update(zip(keys, defaults))
    return rows


def parse(cell):
    """A README default cell as a value: null, true, false, numbers, [a, b] lists, else the text."""
    cell = cell.strip("`")
    if cell.startswith("[") and cell.endswith("]"):
        return [parse(item.strip()) for item in cell[1:-1].split(",")]
    words = {"null": None, "true": True, "false": False}
    if cell in words:
        return words[cell]
    try:
        return float(cell)
    except ValueError:
        return cell


def declared(declaration, prefix=""):
    """{dotted key: default} of a declaration's fields, nested declarations flattened."""
    out = {}
    for field in dataclasses.fields(declaration):
        default = default_of(field)
        if dataclasses.is_dataclass(default) and dataclasses.fields(default):
            out.update(declared(type(default), f"{prefix}{field.name}."))
        else:
            out[prefix + field.name] = default
    return out


def assert_table_matches(rows, keys):
    assert set(rows) == set(keys), f"README table: missing {set(keys) - set(rows)}, undeclared {set(rows) - set(keys)}"
    for key, default in keys.items():
        want = None if dataclasses.is_dataclass(default) else default  # an empty section: null in the YAML
        assert parse(rows[key]) == want, f"README says {key} defaults to {rows[key]}, the declaration {want!r}"


def test_the_config_yaml_table_lists_every_top_level_key_with_its_default():
    keys = declared(config_schema.Run)
    keys["lora"] = None  # the group: null unless lora=default
    paths = {k: keys.pop(k) for k in list(keys) if k.startswith("dataset_paths.")}  # one per registry name
    keys["dataset_paths.<name>"] = None if set(paths.values()) == {None} else paths
    assert_table_matches(table(section("### `config/config.yaml`")), keys)


def test_the_ift_table_lists_every_ift_key_with_its_default():
    assert_table_matches(table(section("### IFT settings (`config/loss/ift.yaml`)")), declared(losses.LOSSES["ift"]))


def test_the_lora_table_lists_every_lora_key_with_its_default():
    rows = table(section("## LoRA"))
    keys = {f"lora.{k}": v for k, v in declared(config_schema.Lora).items()}
    assert_table_matches({k: v for k, v in rows.items() if k != "lora"}, keys)


@pytest.mark.parametrize("name", [n for n in losses.LOSSES if n != "ift"])
def test_the_baselines_table_gives_each_losss_keys_and_defaults(name):
    (row,) = [line for line in section("## Baselines").splitlines() if line.startswith(f"| `{name}` |")]
    keys_cell = row.strip().strip("|").split("|")[-1]
    found = dict(re.findall(r"`(\w+)` \(([^,)]+)", keys_cell))
    assert {k: parse(v) for k, v in found.items()} == declared(losses.LOSSES[name])


def test_the_model_section_names_every_model_key():
    text = section("### `config/model/*.yaml`")
    named = set(re.findall(r"`(\w+)`", text[text.index("Keys:"):]))
    assert set(declared(config_schema.Model)) <= named


def test_a_table_that_drifts_from_the_declarations_fails():
    keys = {"lr": 5e-4, "optimizer": "RMSprop"}
    assert_table_matches({"lr": "5e-4", "optimizer": "RMSprop"}, keys)
    with pytest.raises(AssertionError, match="lr defaults to 1e-3"):
        assert_table_matches({"lr": "1e-3", "optimizer": "RMSprop"}, keys)
    with pytest.raises(AssertionError, match="missing"):
        assert_table_matches({"lr": "5e-4"}, keys)
