"""modnet.imports.defer_unused_imports: a deferred package runs its code at its first use, in the order an ordinary
import would, and not when a scan of sys.modules reads ``__file__`` (inspect.getmodule, which torch's and
pydantic's imports call); Avalanche's import then leaves wandb and qpsolvers (and jax behind it) unloaded, and
both work when used."""
import inspect
import subprocess
import sys
import textwrap
import types

import pytest

from modnet.imports import defer_unused_imports


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A package 'planted_pkg_<id>' whose __init__ and submodule log their execution in ``order``."""
    name = f"planted_pkg_{tmp_path.name.replace('-', '_')}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import builtins
        builtins._planted_order.append("init")
        VALUE = 42
    """))
    (pkg / "sub.py").write_text(textwrap.dedent(f"""
        import builtins
        from {name} import VALUE  # the parent's code must have run
        builtins._planted_order.append("sub")
        DOUBLE = 2 * VALUE
    """))
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('broken at import')\n")
    import builtins

    order = []
    monkeypatch.setattr(builtins, "_planted_order", order, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, order
    for key in [k for k in sys.modules if k.startswith(name)]:
        del sys.modules[key]


def test_a_deferred_package_runs_at_its_first_use_not_at_a_scan_of_its_file(planted):
    name, order = planted
    assert defer_unused_imports((name, "no_such_package_anywhere")) == [name]  # not installed: left alone
    module = __import__(name)
    assert order == [] and module.__file__.endswith("__init__.py") and module.__name__ == name
    inspect.getmodule(test_a_deferred_package_runs_at_its_first_use_not_at_a_scan_of_its_file)  # reads every __file__
    assert order == []
    assert module.VALUE == 42 and order == ["init"]
    assert type(module) is types.ModuleType and sys.modules[name] is module
    assert defer_unused_imports((name,)) == []  # imported: left alone


def test_a_submodule_import_runs_the_package_first_as_an_ordinary_import(planted):
    name, order = planted
    defer_unused_imports((name,))
    sub = __import__(f"{name}.sub", fromlist=["DOUBLE"])
    assert order == ["init", "sub"] and sub.DOUBLE == 84


def test_a_package_that_fails_raises_at_first_use_and_is_not_left_imported(planted):
    name, _ = planted
    broken = f"{name}_broken"
    defer_unused_imports((broken,))
    module = __import__(broken)
    with pytest.raises(RuntimeError, match="broken at import"):
        module.anything
    assert broken not in sys.modules


def test_avalanche_imports_without_wandb_or_qpsolvers_and_both_work_when_used():
    """In a fresh interpreter: the modnet command's deferral, Avalanche's import, then GEM's QP (a hand-solved
    one: min 1/2 |x|^2 - x.(1, 2) s.t. x1 + x2 <= 1, x = (0, 1)) and a submodule import of wandb."""
    code = textwrap.dedent("""
        import sys
        from modnet.imports import defer_unused_imports
        assert defer_unused_imports() == ["wandb", "qpsolvers"], sys.modules.get("wandb")
        import avalanche.training.plugins  # GEM's plugin imports qpsolvers, the confusion matrix wandb
        print("loaded", sorted(n for n in ("wandb.sdk", "jax", "qpsolvers.solvers") if n in sys.modules))
        import numpy as np
        import qpsolvers
        x = qpsolvers.solve_qp(P=np.eye(2), q=-np.array([1.0, 2.0]), G=np.array([[1.0, 1.0]]), h=np.array([1.0]),
                               solver="quadprog")
        print("qp", np.round(x, 6).tolist())
        import wandb.sdk
        print("wandb", callable(wandb.init), type(sys.modules["wandb"]).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "loaded []" in lines
    assert "qp [0.0, 1.0]" in lines
    assert "wandb True module" in lines


def test_the_modnet_command_defers_before_its_job(monkeypatch, tmp_path):
    import modnet.imports
    from modnet.cli import main

    calls = []
    monkeypatch.setattr(modnet.imports, "defer_unused_imports", lambda *a: calls.append(a) or [])
    assert main(["cl", "train.epochs=-1", f"output_dir={tmp_path}"]) == 2  # refused by validation, after it
    assert calls == [()]
