"""The import graph (pitlm.layers): no cycle, no arrow from a layer to a higher one; and the checker catches both."""

from pitlm.layers import LAYERS, build_graph, main


def _package(root, files: dict[str, str]):
    for rel, text in files.items():
        p = root / "pitlm" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "pitlm"


def test_pitlm_has_no_import_cycle_and_no_upward_arrow(capsys):
    graph = build_graph()
    assert graph.cycles == []
    assert graph.upward() == []
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "cycles: 0" in out and "upward_arrows: 0" in out
    # the stages really are connected as the layers say (the checker sees the arrows it should)
    edges = graph.package_edges()
    assert ("eval", "train") in edges and ("train", "corpus") in edges and ("train", "kernels") in edges


def test_the_checker_finds_a_cycle_a_deferred_upward_import_and_a_relative_one(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "eval/__init__.py": "",
        "eval/a.py": "from pitlm.eval.b import x\n",
        "eval/b.py": "from .a import y\nx = 1\n",
        "train/__init__.py": "",
        "train/m.py": "def f():\n    from pitlm.eval import a  # deferred, still an arrow\n",
        "train/cli.py": "from pitlm.eval.a import y\n",
    })
    graph = build_graph(root)
    assert graph.cycles == [["pitlm.eval.a", "pitlm.eval.b"]]
    assert ("pitlm.train.m", "pitlm.eval.a") in graph.upward()
    assert ("pitlm.train.cli", "pitlm.eval.a") in graph.upward()  # a stage's CLI is not above the next stage
    assert ("pitlm.eval.a", "pitlm.eval.b") not in graph.upward()


def test_every_package_and_top_level_module_has_a_layer():
    named = {n for layer in LAYERS for n in layer}
    units = {m.split(".")[1] if "." in m else "__init__" for m in build_graph().modules.nodes}
    assert units <= named, units - named


def test_file_table_lists_every_module_once_by_layer_with_its_summary():
    from pitlm.layers import ROOT, file_table

    lines = file_table()
    listed = [ln.split()[0] for ln in lines if not ln.startswith("#")]
    assert sorted(listed) == sorted(str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py"))
    heads = [ln for ln in lines if ln.startswith("# layer")]
    assert heads[0].startswith("# layer 0:") and "eval" in next(h for h in heads if "eval" in h)
    row = next(ln for ln in lines if ln.startswith("pitlm/volume.py"))
    assert "PITLM_HOME" in row and len(row) <= 120
