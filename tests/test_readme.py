"""The README is true: its layout matches the tree, its examples use words the demo model knows, its commands
name files that exist, and its results block comes from scripts/refresh_results.py at a named commit."""

import ast
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from _trained_run import trained_run

from flax_textvae.data import synthetic_vocabulary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import refresh_results  # noqa: E402

README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:] if end < 0 else README[start:end]


def test_layout_section_names_every_module_and_only_existing_ones():
    layout = _section("Layout")
    named = set(re.findall(r"`((?:flax_textvae/)?[\w/]+\.py)`", layout))
    package = {
        os.path.relpath(os.path.join(d, f), REPO)
        for d, _, fs in os.walk(os.path.join(REPO, "flax_textvae"))
        for f in fs
        if f.endswith(".py") and f != "__init__.py"
    }
    full = {n if n.startswith("flax_textvae/") else None for n in named} - {None}
    assert full, "the layout section lists modules by their path"
    assert not full - package, f"README names modules that do not exist: {sorted(full - package)}"
    assert not package - full, f"README's layout misses: {sorted(package - full)}"


def _python_snippet() -> str:
    return re.search(r"```python\n(.*?)```", _section("Metrics"), re.S).group(1)


def test_python_snippet_uses_only_words_the_demo_model_knows():
    tree = ast.parse(_python_snippet())
    texts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    sentences = [t for t in texts if " " in t]
    assert sentences
    vocab = set(synthetic_vocabulary())
    for sentence in sentences:
        assert set(sentence.split()) <= vocab, (sentence, set(sentence.split()) - vocab)


def _expected_rows(call: ast.Call) -> int:
    """How many sentences the README's call asks for: its list's length, ``sample``'s n, ``interpolate``'s steps."""
    method = call.func.attr
    if method in ("reconstruct", "encode"):
        return len(ast.literal_eval(call.args[0]))
    if method == "sample":
        return ast.literal_eval(call.args[0])
    if method == "interpolate":
        return next(ast.literal_eval(k.value) for k in call.keywords if k.arg == "steps")
    raise AssertionError(f"the README calls vae.{method}, which this test does not know how to check")


def test_python_snippet_runs_on_a_trained_run(tmp_path_factory):
    """The snippet, statement by statement as in a REPL, on a trained tiny run in place of runs/demo."""
    _, workdir = trained_run(tmp_path_factory)
    tree = ast.parse(_python_snippet())
    paths = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == "runs/demo"]
    assert len(paths) == 1, "the snippet loads runs/demo, the default workdir of python run_train.py"
    paths[0].value = workdir
    namespace, shown = {}, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for stmt in tree.body:
            if isinstance(stmt, ast.Expr):  # a REPL prints the value of a bare expression
                shown.append((stmt.value, eval(compile(ast.Expression(stmt.value), "README.md", "eval"), namespace)))
            else:
                exec(compile(ast.Module([stmt], []), "README.md", "exec"), namespace)
    assert not [w for w in caught if "vocabulary lacks" in str(w.message)]  # its words are the corpus's
    vae = namespace["vae"]
    assert type(vae).__name__ == "TrainedTextVAE"
    assert [call.func.attr for call, _ in shown] == ["reconstruct", "sample", "interpolate"]
    for call, value in shown:
        assert isinstance(value, list) and len(value) == _expected_rows(call), (ast.unparse(call), value)
        assert all(isinstance(line, str) and line.strip() for line in value), (ast.unparse(call), value)
    encode = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.value.func.attr == "encode")
    rows = _expected_rows(encode)
    for name in ("mean", "logvar"):
        assert namespace[name].shape == (rows, vae.latent_size) and np.all(np.isfinite(namespace[name]))


def test_fresh_machine_commands_name_existing_files():
    block = re.search(r"```bash\n(.*?)```", _section("Fresh machine: two commands"), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands[0].startswith("pip install -e '.[test]'")
    assert "python run_train.py" in commands and os.path.isfile(os.path.join(REPO, "run_train.py"))
    assert "python -m pytest -q" in commands
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert "python -m pytest -q\n" in ci  # CI runs the README's test command


def test_every_config_the_readme_names_exists():
    for path in set(re.findall(r"`(configs/[\w/]+\.py)`", README)):
        assert os.path.isfile(os.path.join(REPO, path)), path


def test_replace_block_swaps_only_the_marked_text():
    text = f"a\n{refresh_results.BEGIN}\nold\n{refresh_results.END}\nb"
    assert refresh_results.replace_block(text, "new") == f"a\n{refresh_results.BEGIN}\nnew\n{refresh_results.END}\nb"
    with pytest.raises(ValueError):
        refresh_results.replace_block("no markers", "x")


def _stamped_block() -> tuple[str, str]:
    inner = README.split(refresh_results.BEGIN, 1)[1].split(refresh_results.END, 1)[0]
    m = re.search(r"Measured at commit `([0-9a-f]+)(\+dirty)?`", inner)
    assert m, "the results block carries the commit it was measured at"
    return m.group(1), inner


def test_results_block_is_stamped_with_a_commit_of_this_repository():
    commit, _ = _stamped_block()
    p = subprocess.run(["git", "cat-file", "-t", commit], cwd=REPO, capture_output=True, text=True)
    if p.returncode and not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    assert p.stdout.strip() == "commit", f"{commit} is not a commit of this repository"


@pytest.mark.slow
def test_results_block_matches_a_fresh_run_of_the_refresh_script(tmp_path):
    commit, inner = _stamped_block()
    # Files added since the stamp cannot change the demo unless a changed file imports them.
    changed = subprocess.run(
        [
            "git",
            "diff",
            "--quiet",
            "--diff-filter=a",
            commit,
            "HEAD",
            "--",
            "flax_textvae",
            "configs",
            "run_train.py",
            "run_eval.py",
        ],
        cwd=REPO,
    )
    if changed.returncode:
        pytest.skip(f"the code changed since {commit}: run scripts/refresh_results.py to refresh the block")
    fresh = refresh_results.block(str(tmp_path / "demo"))
    number = re.compile(r"^\s*(\w+)\s+(-?[\d.]+)\s*$", re.M)
    want = {k: float(v) for k, v in number.findall(inner.split("```")[1])}
    got = {k: float(v) for k, v in number.findall(fresh.split("```")[1])}
    assert want.keys() == got.keys() and want
    for key in want:
        assert round(got[key], 2) == round(want[key], 2), (key, got[key], want[key])
    assert inner.split("```")[3].strip() == fresh.split("```")[3].strip()  # the interpolation lines
