"""Plugin discovery through real entry points, tolerant loading, and name clashes."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from fusionkit.core.errors import PluginError
from fusionkit.core.registry import load_registry
from tests.conftest import make_distribution

BUILTINS = {
    ("encoder", "linear"),
    ("fusion", "concat"),
    ("gate", "last"),
    ("head", "regression"),
}


GOOD = """
from torch import nn

from fusionkit.plugin import hookimpl

@hookimpl
def fusionkit_register_components(registry):
    registry.add("gate", "mine", build=lambda p, *, in_dims, num_steps: nn.Identity())
"""


def test_builtins_are_discovered_through_entry_points():
    reg = load_registry(strict=True)
    found = {(c.kind, c.name) for c in reg.components()}
    assert found >= BUILTINS
    builtins = [c for c in reg.components() if (c.kind, c.name) in BUILTINS]
    assert all(c.distribution == "fusionkit" and c.version for c in builtins)


def test_third_party_distribution_is_discovered(tmp_path, monkeypatch):
    make_distribution(tmp_path, "fk-thirdparty", "fk_thirdparty", GOOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    comp = load_registry(strict=True).get("gate", "mine")
    assert (comp.distribution, comp.version, comp.plugin) == (
        "fk-thirdparty",
        "0.3",
        "fk_thirdparty",
    )


def test_broken_plugin_warns_once_and_others_still_load(tmp_path, monkeypatch):
    make_distribution(tmp_path, "fk-broken", "fk_broken", "raise ImportError('no such thing')\n")
    make_distribution(tmp_path, "fk-thirdparty", "fk_thirdparty", GOOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = load_registry(strict=False)
    msgs = [str(w.message) for w in caught if "fusionkit" in str(w.message)]
    assert len(msgs) == 1 and "fk-broken" in msgs[0] and "no such thing" in msgs[0]
    assert ("gate", "mine") in reg and ("fusion", "concat") in reg
    with pytest.raises(PluginError, match="fk-broken"):
        load_registry(strict=True)


def test_invalid_registration_is_rejected_without_partial_state(tmp_path, monkeypatch):
    make_distribution(
        tmp_path,
        "fk-bad",
        "fk_bad",
        """
        from fusionkit.plugin import hookimpl

        @hookimpl
        def fusionkit_register_components(registry):
            registry.add("gate", "half", build=lambda p, **k: None)
            registry.add("fusoin", "x", build=lambda p, **k: None)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = load_registry(strict=False)
    assert ("gate", "half") not in reg
    assert any("did you mean 'fusion'" in str(w.message) for w in caught)


def test_duplicate_names_are_an_error_only_where_used_naming_both(tmp_path, monkeypatch):
    make_distribution(
        tmp_path,
        "fk-clash",
        "fk_clash",
        """
        from fusionkit import plugin

        @plugin.hookimpl
        def fusionkit_register_components(registry):
            registry.add("fusion", "concat", build=lambda p, *, in_dims: None)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = load_registry(strict=False)  # every other component stays usable
    assert reg.get("fusion", "rjca").name == "rjca"
    assert reg.clashes() == [("fusion", "concat")]
    with pytest.raises(PluginError) as info:
        reg.get("fusion", "concat")
    assert "fusionkit 0.2.0" in str(info.value) and "fk-clash 0.3" in str(info.value)
    with pytest.raises(PluginError, match="fk-clash"):
        load_registry(strict=True)


def test_unknown_component_lookup_lists_registered():
    reg = load_registry(strict=True)
    with pytest.raises(PluginError, match=r"unknown gate 'lats' \(did you mean 'last'\?\)"):
        reg.get("gate", "lats")


def test_plugins_list_cli_json():
    proc = subprocess.run(
        [sys.executable, "-m", "fusionkit", "plugins", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    data = json.loads(proc.stdout)
    found = {(c["kind"], c["name"]) for c in data["components"]}
    assert found >= BUILTINS
    assert data["failures"] == []


def test_core_imports_no_plugin_package():
    """The core knows components only through the registry, never by importing a plugin."""
    core = Path(__file__).resolve().parents[1] / "fusionkit"
    offenders = [
        f"{p.name}:{i}"
        for p in core.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "import fusionkit_" in line or "from fusionkit_" in line
    ]
    assert offenders == []
