"""benchmarks/run.py declares every benchmark script (read with `ast`: nothing is imported or run)."""

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
HELPERS = {"__init__.py", "common.py"}  # shared code, not benchmarks


def registry() -> list[dict]:
    tree = ast.parse((BENCH / "run.py").read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "REGISTRY")
    fields = ("name", "command", "device", "minutes", "output", "what")
    return [dict(zip(fields, (ast.literal_eval(a) for a in call.args))) for call in node.value.elts]


def test_every_benchmark_script_is_in_the_registry_with_device_time_and_output():
    entries = registry()
    scripts = sorted(p.name for p in BENCH.iterdir() if p.suffix in (".py", ".sh") and p.name not in HELPERS)
    commands = " ".join(e["command"] for e in entries)
    missing = [s for s in scripts if f"benchmarks/{s}" not in commands and f"benchmarks.{Path(s).stem} " not in commands + " "]
    assert len(scripts) > 15 and missing == []
    assert all(e["device"] in ("cpu", "gpu", "cpu/gpu") and e["minutes"] > 0 and e["output"] for e in entries)
    assert len({e["name"] for e in entries}) == len(entries)


def test_no_benchmark_script_writes_to_a_machine_path():
    for p in BENCH.iterdir():
        if p.suffix in (".py", ".sh"):
            text = p.read_text(encoding="utf-8")
            assert "/root/smol" not in text and "/root/rapcache" not in text, p.name
