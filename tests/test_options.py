"""The quantize options are declared once (QuantizeOptions' fields) and every face of them follows:
`hubtool quantize`'s and `hubtool publish`'s flags, the command run.json records, hubtool.toml's
``[spec]`` keys and the Optimum quantizer's keyword arguments.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from hubtool.cli import app, main
from hubtool.cli.quantize import cli_options
from hubtool.config import load_config
from hubtool.errors import HubtoolError
from hubtool.stages.quantize import (
    SPEC_KEYS,
    QuantizeOptions,
    option_fields,
    quantize_command,
    quantize_options,
)

# `hubtool publish`'s own parameters (the Hub, the card, compare and eval, hubtool.toml)
PUBLISH_ONLY = {
    "repo_id",
    "endpoint",
    "private",
    "tag",
    "dry_run",
    "template",
    "default_format",
    "prompts",
    "tasks",
    "limit",
    "base_model",
    "config",
    "skip_verify",
    "layout",
}


def command(name: str):
    """The click command Typer builds for ``hubtool <name>``."""
    return typer.main.get_command(app).commands[name]


def params(name: str) -> dict:
    """``hubtool <name>``'s parameters by name (``--help`` lists the same)."""
    return {p.name: p for p in command(name).params}


def test_every_option_has_a_quantize_and_a_publish_flag_and_vice_versa():
    names = {f.name for f in option_fields()}
    assert {f.name for f in fields(QuantizeOptions)} - names == {"command"}  # the record, not an option
    assert set(params("quantize")) == names
    assert set(params("publish")) - PUBLISH_ONLY == names
    quantize, publish = params("quantize"), params("publish")
    for f in option_fields():
        q, p = quantize[f.name], publish[f.name]
        assert q.help == f.metadata["help"], f.name
        if f.metadata["publish"]:  # the same flags and help; the default left to hubtool.toml
            assert (p.opts, p.secondary_opts, p.help) == (q.opts, q.secondary_opts, q.help), f.name
            assert p.default is None, f.name
    assert quantize["run_dir"].opts == ["-o", "--output"] and publish["run_dir"].opts == ["-o", "--run-dir"]
    assert (quantize["sym"].opts, quantize["sym"].secondary_opts) == (["--sym"], ["--asym"])
    assert quantize["formats"].default == "auto_round,auto_gptq,hubtool" and quantize["bits"].default == 4


def test_help_lists_every_flag():
    runner = CliRunner()
    for name in ("quantize", "publish"):
        out = runner.invoke(app, [name, "--help"], terminal_width=200, env={"COLUMNS": "200"}).output
        for p in command(name).params:
            for flag in p.opts + p.secondary_opts:
                if flag.startswith("-"):
                    assert flag in out, (name, flag)


def _parse(argv: list[str]) -> QuantizeOptions:
    """``hubtool quantize ...`` read back through the quantize command's own parser."""
    assert argv[:2] == ["hubtool", "quantize"]
    ctx = command("quantize").make_context("quantize", argv[2:])
    return cli_options(ctx.params, command=argv)


EVERYTHING = {
    "revision": "v1",
    "bits": 4,
    "group_size": 64,
    "sym": False,
    "method": "opt-rtn",
    "recipe": "light",
    "iters": 5,
    "nsamples": 8,
    "seqlen": 32,
    "batch_size": 2,
    "lr": 0.005,
    "seed": 7,
    "dtype": "float16",
    "device": "cuda:1",
    "skip": "lm_head|x",
    "trust_remote_code": True,
    "quantize_vision": True,
    "calib": ["a.txt", "builtin"],
    "formats": ["auto_gptq", "hubtool"],
}


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"method": "rtn", "formats": ["hubtool"]},
        {"iters": 0, "seed": 0, "lr": 1e-3, "calib": "one.txt"},
        EVERYTHING,
        {**EVERYTHING, "device_map": "cuda:0,cuda:1", "resume": True},
    ],
)
def test_quantize_command_round_trips(spec):
    opts = quantize_options("org/model", Path("runs/x"), spec)
    back = _parse(opts.command)
    # device placement and run-folder actions are not part of the command that reproduces the bytes
    assert back == replace(opts, device_map=None, overwrite=False, resume=False)


def test_quantize_command_is_the_one_run_json_always_recorded():
    """Same inputs, same command (order included) as before the options were declared once."""
    assert quantize_options("org/model", Path("runs/x"), EVERYTHING).command == [
        *("hubtool", "quantize", "org/model", "-o", "runs/x", "--revision", "v1", "--group-size", "64"),
        *("--method", "opt-rtn", "--recipe", "light", "--iters", "5", "--nsamples", "8", "--seqlen", "32"),
        *("--batch-size", "2", "--lr", "0.005", "--seed", "7", "--dtype", "float16", "--device", "cuda:1"),
        *("--skip", "lm_head|x", "--asym", "--calib", "a.txt", "--calib", "builtin"),
        *("--formats", "auto_gptq,hubtool", "--trust-remote-code", "--quantize-vision"),
    ]
    assert quantize_command(QuantizeOptions("pypi:x", Path("r"))) == [
        "hubtool",
        "quantize",
        "pypi:x",
        "-o",
        "r",
    ]


def test_spec_keys_are_the_fields_marked_spec():
    assert SPEC_KEYS == {f.name for f in option_fields() if f.metadata["spec"]}
    assert not SPEC_KEYS & {"source", "run_dir", "calib", "overwrite", "resume", "command"}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("banana = 1", "unknown [spec] key 'banana' (hint: known: batch_size, bits, device,"),
        ("resume = true", "unknown [spec] key 'resume'"),  # an action of one run, not a spec
        ("calib = 'x.txt'", "unknown [spec] key 'calib'"),  # hubtool.toml's top-level `calibrations`
        ('iters = "5"', "[spec] key iters must be an integer, not '5'"),
        ("sym = 1", "[spec] key sym must be true or false, not 1"),
    ],
)
def test_spec_key_that_is_not_a_field_is_refused(capsys, tmp_path, monkeypatch, text, needle):
    toml = tmp_path / "hubtool.toml"
    toml.write_text(f'repo_id = "a/b"\n[spec]\n{text}\n')
    with pytest.raises(HubtoolError) as info:
        load_config(toml)
    assert info.value.line().startswith(f"error: {toml}: ") and needle in info.value.line()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        main(["publish", "acme/tiny-chat", "--dry-run", str(tmp_path / "dry")])
    assert code.value.code == 2
    assert capsys.readouterr().err == info.value.line() + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hubtool.toml"]


def test_spec_keys_take_dashes_and_a_comma_list(tmp_path):
    toml = tmp_path / "hubtool.toml"
    toml.write_text('[spec]\ngroup-size = 64\nformats = "auto_round,hubtool"\nsym = false\n')
    assert load_config(toml)["spec"] == {"group_size": 64, "formats": ["auto_round", "hubtool"], "sym": False}
    with pytest.raises(HubtoolError, match="unknown quantize option 'banana'"):
        quantize_options("org/model", Path("r"), {"banana": 1})
    with pytest.raises(HubtoolError, match="unknown quantize option 'command'"):
        quantize_options("org/model", Path("r"), {"command": ["x"]})


def test_publish_passes_its_options_to_the_pipeline(tmp_path, monkeypatch):
    """Every shared flag lands in the spec (or the calibration sets) publish hands to the pipeline."""
    import hubtool.pipeline

    seen = {}

    def publish(source, repo_id, **kwargs):
        seen.update(kwargs, source=source, repo_id=repo_id)
        raise HubtoolError("stop here")

    monkeypatch.setattr(hubtool.pipeline, "publish", publish)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hubtool.toml").write_text('[spec]\nmethod = "rtn"\ngroup_size = 32\nsym = false\n')
    argv = ["publish", "org/model", "--repo-id", "a/b", "-o", "runs/x", "--group-size", "64", "--sym"]
    argv += ["--formats", "hubtool,auto_round", "--calib", "c1.txt", "--calib", "c2.txt"]
    argv += ["--device-map", "cuda:0,cuda:1", "--resume", "--no-quantize-vision", "--lr", "0.01"]
    with pytest.raises(SystemExit):
        main(argv)
    assert (seen["source"], seen["repo_id"], seen["run_dir"]) == ("org/model", "a/b", Path("runs/x"))
    assert seen["calibrations"] == ["c1.txt", "c2.txt"]
    assert seen["spec"] == {
        "method": "rtn",  # from hubtool.toml
        "group_size": 64,  # the flag overrides the file
        "sym": True,
        "formats": "hubtool,auto_round",
        "device_map": "cuda:0,cuda:1",
        "resume": True,
        "quantize_vision": False,
        "lr": 0.01,
    }
    opts = quantize_options(seen["source"], seen["run_dir"], seen["spec"], calib=seen["calibrations"])
    assert (opts.formats, opts.calib, opts.resume) == (["hubtool", "auto_round"], ["c1.txt", "c2.txt"], True)


def test_optimum_quantizer_takes_the_same_options():
    from hubtool.integrations.optimum import (
        LOAD_OPTIONS,
        QUANTIZE_OPTIONS,
        RUN_FOLDER_OPTIONS,
        HubtoolQuantizer,
    )

    everything = QUANTIZE_OPTIONS + LOAD_OPTIONS + RUN_FOLDER_OPTIONS
    assert sorted(everything) == sorted(f.name for f in option_fields())
    assert len(set(everything)) == len(everything)
    q = HubtoolQuantizer.from_pretrained(torch.nn.Linear(4, 4))
    with pytest.raises(HubtoolError, match="unknown keyword argument 'banana'"):
        q.quantize("unused", banana=1)
    with pytest.raises(HubtoolError, match="unknown keyword argument 'resume'"):
        q.quantize("unused", resume=True)
    with pytest.raises(HubtoolError, match="keyword argument group_size must be an integer, not '64'"):
        q.quantize("unused", group_size="64")
    assert not Path("unused").exists()


def test_optimum_cli_declares_the_same_flags():
    from optimum.commands.base import RootOptimumCLICommand
    from optimum.commands.optimum_cli import register_optimum_cli_subcommand

    from hubtool.integrations.optimum import LOAD_OPTIONS, QUANTIZE_OPTIONS, REGISTER_COMMANDS

    root = RootOptimumCLICommand("optimum-cli")
    for cmd in REGISTER_COMMANDS:
        register_optimum_cli_subcommand(cmd, parent_command=root)
    argv = ["hubtool", "quantize", "src", "-o", "out", "--asym", "--group-size", "64", "--calib", "a.txt"]
    args = vars(root.parser.parse_args([*argv, "--seed", "3", "--device-map", "cpu,cpu", "--formats", "x,y"]))
    assert {k: args[k] for k in QUANTIZE_OPTIONS + LOAD_OPTIONS if args[k] is not None} == {
        "sym": False,
        "group_size": 64,
        "calib": ["a.txt"],
        "seed": 3,
        "device_map": "cpu,cpu",
        "formats": "x,y",
    }
