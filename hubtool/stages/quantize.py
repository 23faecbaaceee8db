"""The quantize stage: SOURCE -> 16-bit model -> int4 variants -> exported formats -> run.json.

Every check that needs no model runs before the model loads, and the run folder is touched only once the
model, its layer plan and every calibration set have loaded (``rundir`` holds the folder's rules).
``run.json`` appears only when the stage has finished; while it runs, the folder holds an ``.incomplete``
marker instead.

``QuantizeOptions`` declares each option once (``option``: type, default, help, flags, roles); the CLI's
flags, hubtool.toml's ``[spec]`` keys (``SPEC_KEYS``, ``check_options``), the reproducing command
(``quantize_command``) and the Optimum quantizer's keywords all derive from its fields.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import torch

from .. import record as rec
from .. import rundir
from ..__about__ import __version__
from ..core.lmhead import HEAD_FORMAT, HEAD_MODES
from ..core.memory import pin_mmap_threshold
from ..core.spec import QuantSpec
from ..envinfo import library_versions
from ..errors import HubtoolError
from ..formats.export import DEFAULT_MAX_SHARD_SIZE, FORMATS, check_shard_size, export_format
from ..formats.gguf import GGUF_TYPES, check_gguf_config, check_gguf_request, is_gguf, kept_out_of_int4
from ..formats.gguf import canonical_format as gguf_format
from ..formats.table import ALL_FORMATS
from ..quant.driver import ProgressFn, QuantResult, quantize_model
from ..quant.layers import QuantPlan, plan_layers
from ..quant.lmhead import check_head, quantize_head
from ..quant.spec import Recipe, check_method, make_recipe
from ..source import gguf_metadata, load_source, local_dir, parse_dtype, preflight, read_config
from .public import public_calibration, public_path

log = logging.getLogger(__name__)

INCOMPLETE = rundir.INCOMPLETE
WORK_DIR = rundir.WORK_DIR


def option(
    default: Any = MISSING,
    *,
    help: str,
    flags: tuple[str, ...] = (),
    factory: Any = MISSING,
    argument: bool = False,
    spec: bool = True,
    argv: bool = True,
    publish: bool = True,
    sep: str | None = None,
) -> Any:
    """A QuantizeOptions field that declares an option once: the CLI, hubtool.toml and run.json derive from it.

    ``help``: the help text. ``flags``: the CLI's names (default ``--name-with-dashes``; a switch may name
    both sides, ``--sym/--asym``); ``argument``: positional instead. ``spec``: a key of hubtool.toml's
    ``[spec]`` table and of `hubtool publish`'s spec. ``argv``: part of the command that reproduces a run.
    ``publish``: `hubtool publish` takes the same flag (else it declares its own, e.g. ``-o/--run-dir``).
    ``sep``: a list given as one value joined by ``sep`` (``--formats a,b``), not as a repeated flag.
    """
    meta = {
        "help": help,
        "flags": flags,
        "argument": argument,
        "spec": spec,
        "argv": argv,
        "publish": publish,
        "sep": sep,
    }
    return field(default=default, default_factory=factory, metadata=meta)


@dataclass
class QuantizeOptions:
    """Everything `hubtool quantize` takes; each option is declared here once (see ``option``).

    From these fields come `hubtool quantize`'s and `hubtool publish`'s flags (``cli.quantize``), the keys
    of hubtool.toml's ``[spec]`` (``SPEC_KEYS``), the command recorded in run.json (``quantize_command``)
    and the keyword arguments of the Optimum quantizer: a new option is one new field.
    """

    source: str = option(
        argument=True,
        spec=False,
        publish=False,
        help="Hub id (org/name), local model folder, .gguf file, or pypi:<model>.",
    )
    run_dir: Path = option(
        flags=("-o", "--output"), spec=False, publish=False, help="Run folder to create (RUN_DIR)."
    )
    revision: str | None = option(None, help="Hub revision (branch, tag or commit).")
    bits: int = option(4, help="Weight bits (4).")
    group_size: int = option(128, help="Group size: 32, 64 or 128.")
    sym: bool = option(True, flags=("--sym/--asym",), help="Symmetric (default) or asymmetric int4.")
    method: str = option("signround", help="signround, opt-rtn or rtn.")
    recipe: str = option("default", help="SignRound recipe: best, default or light.")
    iters: int | None = option(None, help="Override the recipe's iterations per block.")
    nsamples: int | None = option(None, help="Override the number of calibration samples.")
    seqlen: int | None = option(None, help="Override the calibration sequence length.")
    batch_size: int | None = option(None, help="Override the tuning batch size.")
    lr: float | None = option(None, help="Override the SignSGD learning rate.")
    seed: int | None = option(None, help="Random seed (same seed, same bytes).")
    # hubtool.toml names the calibration sets at its top level (``calibrations``), not in [spec]
    calib: list[str] = option(
        factory=list, spec=False, help="Calibration set (repeat for one int4 variant per set)."
    )
    formats: list[str] = option(
        factory=lambda: list(FORMATS), sep=",", help="Comma-separated formats to export."
    )
    max_shard_size: str = option(
        DEFAULT_MAX_SHARD_SIZE, help="Largest safetensors shard of each export (e.g. 5GB, 500MB)."
    )
    dtype: str = option("bfloat16", help="16-bit dtype to load the source in.")
    device: str = option("cpu", help="Device to tune on (cpu, cuda, cuda:1).")
    # where blocks are placed changes no byte of the result: not part of the reproducing command
    device_map: str | None = option(
        None, argv=False, help="Spread a large block over GPUs (e.g. 'cuda:0,cuda:1')."
    )
    trust_remote_code: bool = option(False, help="Allow the model's own Python code to run.")
    quantize_vision: bool = option(False, help="Also quantize the vision tower's blocks.")
    skip: str | None = option(None, help="Regex of linear names to keep 16-bit.")
    quantize_lm_head: str | None = option(
        None,
        help="Also store the lm_head quantized in the hubtool format: int8 or int4 (others keep it 16-bit).",
    )
    overwrite: bool = option(
        False,
        spec=False,
        argv=False,
        publish=False,  # publish's --overwrite redoes every stage: it declares its own
        help="Redo a run: replace what hubtool wrote in RUN_DIR (never a folder it did not make).",
    )
    resume: bool = option(
        False,
        spec=False,
        argv=False,
        help="Continue an interrupted run from its last finished block (same inputs only).",
    )
    command: list[str] = field(default_factory=list)  # not an option: the argv run.json records


def option_fields() -> tuple[Field, ...]:
    """The QuantizeOptions fields that are options (every field but ``command``), in declaration order."""
    return tuple(f for f in fields(QuantizeOptions) if "help" in f.metadata)


SPEC_KEYS = frozenset(f.name for f in option_fields() if f.metadata["spec"])  # hubtool.toml's [spec]


@cache
def option_types() -> dict[str, Any]:
    """Each option's type, resolved (``int | None``, ``list[str]``, ``Path``...)."""
    hints = get_type_hints(QuantizeOptions)
    return {f.name: hints[f.name] for f in option_fields()}


def switch_flags(f: Field) -> tuple[str, str]:
    """The (on, off) flags of a bool option: ``--sym/--asym`` as declared, else ``--x/--no-x``."""
    decl = f.metadata["flags"][0] if f.metadata["flags"] else "--" + f.name.replace("_", "-")
    on, _, off = decl.partition("/")
    return on, off or "--no-" + on[2:]


def value_flag(f: Field) -> str:
    """The flag that takes an option's value: its first declared one, else ``--name-with-dashes``."""
    return f.metadata["flags"][0] if f.metadata["flags"] else "--" + f.name.replace("_", "-")


def check_options(
    values: Mapping[str, Any], allowed: Iterable[str] | None = None, what: str = "quantize option"
) -> dict[str, Any]:
    """``values`` as QuantizeOptions fields, None dropped; a name not ``allowed`` or a value of the wrong type is refused.

    Names may use '-' for '_'. One string is a list of one (``calib``) or split at the field's ``sep``
    (``formats``). ``allowed`` defaults to every option.
    """
    known = {f.name: f for f in option_fields()}
    names = set(known) if allowed is None else set(allowed)
    types = option_types()
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in names:
            raise HubtoolError(f"unknown {what} {key!r}", "known: " + ", ".join(sorted(names)))
        if value is None:
            continue
        out[name] = _checked(known[name], types[name], value, what)
    return out


def _checked(f: Field, hint: Any, value: Any, what: str) -> Any:
    """``value`` for the option ``f`` of type ``hint`` (a string made a list for a list option), or refused."""
    kinds = {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}
    base = next((t for t in get_args(hint) if t is not type(None)), hint) if get_args(hint) else hint
    if get_origin(hint) is list:
        if isinstance(value, str):
            value = value.split(f.metadata["sep"]) if f.metadata["sep"] else [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise HubtoolError(f"{what} {f.name} must be a list of strings, not {value!r}")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        Path: isinstance(value, (str, os.PathLike)),
    }[base]
    if not ok:
        raise HubtoolError(f"{what} {f.name} must be {kinds[base]}, not {value!r}")
    return value


def quantize_command(opts: Any) -> list[str]:
    """The ``hubtool quantize`` argv that reproduces ``opts`` (a QuantizeOptions); defaults are left out.

    After SOURCE and ``-o RUN_DIR`` come the options that take a value, then the switches turned off
    (``--asym``), the lists (``--calib`` repeated, ``--formats a,b``) and the switches turned on, each
    group in declaration order (the order run.json has always recorded).
    """
    defaults = QuantizeOptions(source="", run_dir=Path("."))
    types = option_types()
    groups: dict[int, list[str]] = {0: [], 1: [], 2: [], 3: []}
    for f in option_fields():
        if f.metadata["argument"] or f.name == "run_dir" or not f.metadata["argv"]:
            continue
        value, default = getattr(opts, f.name), getattr(defaults, f.name)
        value = list(value) if isinstance(value, tuple) else value
        if value is None or value == default:
            continue
        if types[f.name] is bool:
            on, off = switch_flags(f)
            groups[3 if value else 1].append(on if value else off)
        elif get_origin(types[f.name]) is list:
            if f.metadata["sep"]:
                joined = value if isinstance(value, str) else f.metadata["sep"].join(value)
                groups[2] += [value_flag(f), joined]
            else:
                for item in [value] if isinstance(value, str) else value:
                    groups[2] += [value_flag(f), str(item)]
        else:
            groups[0] += [value_flag(f), str(value)]
    head = ["hubtool", "quantize", str(opts.source), "-o", str(opts.run_dir)]
    return head + groups[0] + groups[1] + groups[2] + groups[3]


def quantize_options(source: str, run_dir: Path, spec: dict[str, Any] | None = None, **more: Any) -> Any:
    """A QuantizeOptions from a spec dict (hubtool.toml's [spec] or CLI flags) and ``more``; unknown keys are refused."""
    allowed = [f.name for f in option_fields() if f.name not in ("source", "run_dir")]
    values = {**check_options(spec or {}, allowed), **check_options(more, allowed)}
    opts = QuantizeOptions(source=source, run_dir=Path(run_dir), **values)
    opts.command = quantize_command(opts)
    return opts


def parse_formats(value: str | list[str]) -> list[str]:
    """Validate a --formats list (comma-separated or a list)."""
    items = [f.strip() for f in (value.split(",") if isinstance(value, str) else value) if f.strip()]
    items = [gguf_format(f) or f for f in items]  # "gguf:q4_0" -> "gguf_q4_0"
    bad = [f for f in items if f not in FORMATS and not is_gguf(f)]
    if bad or not items:
        raise HubtoolError(
            f"unknown format {bad[0] if bad else '(none)'!r}",
            "use any of " + ",".join([*FORMATS, *(t.alias for t in GGUF_TYPES.values())]),
        )
    return list(dict.fromkeys(items))


def run_spec(opts: QuantizeOptions, formats: list[str]) -> QuantSpec:
    """The storage spec of a run: the options', or the one a GGUF K-quant type is tuned in (which no
    other format stores, so it runs alone)."""
    kquant = [f for f in formats if is_gguf(f) and GGUF_TYPES[f].spec.kquant]
    if not kquant:
        return QuantSpec(opts.bits, opts.group_size, opts.sym)
    alias = GGUF_TYPES[kquant[0]].alias
    if len(formats) > 1:
        raise HubtoolError(
            f"{alias} is tuned in llama.cpp's Q4_K parameterization (6-bit scales and minimums per 32 "
            "weights), which no other format stores",
            f"quantize it in a run of its own: --formats {alias}",
        )
    return GGUF_TYPES[kquant[0]].spec


def check_head_request(mode: str | None, formats: list[str]) -> None:
    """Refuse a --quantize-lm-head the run cannot honour (before the model loads)."""
    if mode is None:
        return
    if mode not in HEAD_MODES:
        raise HubtoolError(f"--quantize-lm-head {mode!r} is not a mode", "use int8 or int4")
    if HEAD_FORMAT not in formats:
        raise HubtoolError(
            f"--quantize-lm-head stores the quantized head in the {HEAD_FORMAT} format only, which this run does "
            "not export",
            f"add {HEAD_FORMAT} to --formats, or drop --quantize-lm-head",
        )


def source_model_type(info: rec.SourceInfo) -> str:
    """The source's model_type without loading it: config.json's, or a GGUF's general.architecture."""
    if info.model_type:
        return info.model_type
    if info.kind == "gguf":
        return str(gguf_metadata(Path(info.name), ("general.architecture",)).get("general.architecture", ""))
    return str(read_config(local_dir(info)).get("model_type", ""))


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool, sources: list[Path] = ()) -> str:
    """Refuse a RUN_DIR that cannot be used as asked (nothing is written); return its ``rundir`` state."""
    return rundir.check(Path(run_dir), overwrite, resume, list(sources))


def prepare_run_dir(run_dir: Path, state: str, resume: bool) -> None:
    """Make RUN_DIR ready (after every check): clear an old hubtool run unless resuming it, then mark it."""
    run_dir = Path(run_dir)
    if state != rundir.NEW and not (resume and state == rundir.RESUMABLE):
        rundir.clear(run_dir)
    rundir.claim(run_dir, "quantize started " + _now() + "\n")


def _source_paths(source: str, info: rec.SourceInfo | None = None) -> list[Path]:
    """The local paths a run folder must stay apart from: SOURCE as given and where it resolved to."""
    given = Path(source).expanduser()
    paths = [given] if given.exists() else []
    if info is not None:
        paths.append(Path(info.name) if info.kind == "gguf" else local_dir(info))
    return paths


def hardware() -> dict[str, Any]:
    """The machine a run used: CPU model and count, memory, GPU if any."""
    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def variant_names(calibs: list[str]) -> list[str]:
    """One variant name per calibration set: "int4" alone, else "int4-<calibration name>"."""
    if len(calibs) <= 1:
        return ["int4"]
    names = []
    for c in calibs:
        stem = Path(c).stem if Path(c).suffix else c.rstrip("/").split("/")[-1]
        name = "int4-" + "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in stem)
        while name in names:
            name += "-2"
        names.append(name)
    return names


def format_dir(variant: str, fmt: str, single: bool) -> str:
    """Where a variant's format lives in the run folder (relative path)."""
    return f"formats/{fmt}" if single else f"formats/{variant}/{fmt}"


def run_quantize(opts: QuantizeOptions, progress: ProgressFn | None = None) -> rec.RunRecord:
    """Quantize ``opts.source`` into ``opts.run_dir`` (one variant per calibration set) and write run.json."""
    t0 = time.perf_counter()
    pin_mmap_threshold()  # before the model loads: a heap grown while loading would stay fragmented
    method = check_method(opts.method)
    formats = parse_formats(opts.formats)
    spec = run_spec(opts, formats)
    dtype = parse_dtype(opts.dtype)
    check_shard_size(opts.max_shard_size)
    recipe = make_recipe(
        opts.recipe,
        iters=opts.iters,
        nsamples=opts.nsamples,
        seqlen=opts.seqlen,
        batch_size=opts.batch_size,
        lr=opts.lr,
        seed=opts.seed,
    )
    check_head_request(opts.quantize_lm_head, formats)
    if method == "rtn" and opts.calib:
        raise HubtoolError(
            "--calib has no effect with --method rtn", "drop --calib, or use --method signround/opt-rtn"
        )
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise HubtoolError(
            f"--device {opts.device} asked for, but no CUDA device is available", "use --device cpu"
        )
    run_dir = rundir.output_path(opts.run_dir)  # the run folder's checks read only, and cost nothing
    state = check_run_dir(run_dir, opts.overwrite, opts.resume, _source_paths(opts.source))
    info = preflight(opts, method)  # every input that needs no model is checked before any write
    rundir.check_apart(run_dir, _source_paths(opts.source, info))
    for fmt in formats:  # an unsupported architecture or spec is refused before anything is quantized
        if is_gguf(fmt):
            check_gguf_request(source_model_type(info), fmt, spec)
    if any(is_gguf(f) for f in formats) and info.kind != "gguf":  # a GGUF source is llama.cpp's already
        from transformers import AutoConfig

        check_gguf_config(
            AutoConfig.from_pretrained(local_dir(info), trust_remote_code=opts.trust_remote_code)
        )
    resume = opts.resume and state == rundir.RESUMABLE
    inputs = _inputs(opts, info, spec, method, recipe, formats)
    if resume:
        rundir.check_inputs(run_dir, inputs)
    try:
        return _run(opts, info, spec, method, formats, dtype, recipe, run_dir, t0, progress, state, inputs)
    except OSError as exc:
        err = rundir.os_error(exc, run_dir)
        if err is None:
            raise
        raise err from None


def _inputs(opts, info, spec, method, recipe, formats) -> dict[str, Any]:
    """What this run starts from, as ``.work/inputs.json`` records it (see ``rundir.check_inputs``)."""
    return {
        "source": rundir.source_identity(info, local_dir(info)),
        "spec": {
            **asdict(spec),
            "dtype": opts.dtype,
            "quantize_vision": opts.quantize_vision,
            "skip": opts.skip,
            # only when asked: a run folder of an earlier version stays resumable
            **({"quantize_lm_head": opts.quantize_lm_head} if opts.quantize_lm_head else {}),
        },
        "method": method,
        "recipe": asdict(recipe) if method != "rtn" else None,
        "calibration": rundir.calibration_identity(list(opts.calib)) if method != "rtn" else [],
        "formats": formats,
    }


def _run(
    opts, info, spec, method, formats, dtype, recipe, run_dir: Path, t0: float, progress, state, inputs
) -> rec.RunRecord:
    t_load = time.perf_counter()
    loaded = load_source(
        info, dtype=dtype, device="cpu", trust_remote_code=opts.trust_remote_code, stream=True
    )
    timings = {"load": time.perf_counter() - t_load}
    model = loaded.model
    keep = {k: v for f in formats if is_gguf(f) for k, v in kept_out_of_int4(model, f).items()}
    plan = plan_layers(model, spec, quantize_vision=opts.quantize_vision, skip=opts.skip, keep=keep)
    head = check_head(model, opts.quantize_lm_head, spec)
    log.info(
        "quantizing %d linears in %d blocks (%d left 16-bit)",
        len(plan.linear_names()),
        len(plan.blocks),
        len(plan.skipped),
    )
    calibs: list[str | None] = list(opts.calib) or [None]
    names = variant_names([c for c in calibs if c is not None])
    # Every calibration set loads before the run folder is touched: a bad one leaves an old run intact.
    loaded_calibs = [_load_calib(loaded, method, recipe, c, opts.quantize_vision) for c in calibs]
    resume = opts.resume and state == rundir.RESUMABLE
    prepare_run_dir(run_dir, state, resume)
    rundir.write_inputs(run_dir, inputs)
    record = rec.RunRecord(
        source=info,
        spec={
            **asdict(spec),
            "method": method,
            "formats": formats,
            "dtype": opts.dtype,
            "quantize_vision": opts.quantize_vision,
            "skip": opts.skip,
            "quantize_lm_head": opts.quantize_lm_head,
        },
        hubtool_version=__version__,
        created_at=_now(),
        command=opts.command or ["hubtool", "quantize", opts.source],
        libraries=library_versions(),
        hardware=hardware(),
        timings=timings,
    )
    for k, (vname, calib_source) in enumerate(zip(names, calibs, strict=True)):
        calib, calib_seconds = loaded_calibs[k]
        loaded_calibs[k] = (None, 0.0)  # each set is freed once its variant is done
        variant = _quantize_variant(
            opts,
            loaded,
            plan,
            spec,
            method,
            recipe,
            formats,
            vname,
            calib_source,
            run_dir,
            len(calibs) == 1,
            progress,
            calib=calib,
            resume=resume,
            head=head,
        )
        variant.seconds += calib_seconds
        record.variants.append(variant)
        del calib
    record.timings["total"] = time.perf_counter() - t0
    record.peak_rss_bytes = peak_rss_bytes()
    rec.save(record, run_dir)
    (run_dir / INCOMPLETE).unlink(missing_ok=True)
    shutil.rmtree(run_dir / WORK_DIR, ignore_errors=True)
    return record


def _load_calib(loaded, method: str, recipe: Recipe, source: str | None, image_text: bool):
    """(calibration set or None for RTN, seconds it took to load)."""
    if method == "rtn":
        return None, 0.0
    from ..quant.calib import load_calibration

    t0 = time.perf_counter()
    calib = load_calibration(
        source,
        loaded.processor,
        nsamples=recipe.nsamples,
        seqlen=recipe.seqlen,
        seed=recipe.seed,
        is_vlm=loaded.info.is_vlm,
        image_text=image_text,
        batch_size=recipe.batch_size,
    )
    return calib, time.perf_counter() - t0


@dataclass
class QuantizedVariant:
    """One int4 variant in memory: its codes, the calibration it was tuned on, and the metadata exports carry."""

    result: QuantResult
    calibration: rec.CalibrationInfo | None
    recipe: dict[str, Any] | None
    meta: dict[str, Any]


def quantize_variant(
    model: Any,
    processor: Any,
    plan: QuantPlan,
    spec: QuantSpec,
    method: str,
    recipe: Recipe,
    calib_source: str | None,
    *,
    name: str = "int4",
    source_name: str = "",
    is_vlm: bool = False,
    quantize_vision: bool = False,
    device: str = "cpu",
    device_map: str | None = None,
    work_dir: Path | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
    calib: Any = None,
) -> QuantizedVariant:
    """Calibrate (unless RTN) and quantize ``plan``'s linears; the model itself is left unchanged.

    ``calib`` is a calibration set already loaded from ``calib_source`` (else it is loaded here).
    """
    if method != "rtn" and calib is None:
        from ..quant.calib import load_calibration

        calib = load_calibration(
            calib_source,
            processor,
            nsamples=recipe.nsamples,
            seqlen=recipe.seqlen,
            seed=recipe.seed,
            is_vlm=is_vlm,
            image_text=quantize_vision,
            batch_size=recipe.batch_size,
        )
    result = quantize_model(
        model,
        plan,
        spec,
        method,
        recipe,
        calib,
        device=device,
        device_map=device_map,
        work_dir=work_dir,
        resume=resume,
        progress=progress,
    )
    # The plan's order, as an uninterrupted run makes it: blocks reloaded by --resume come back sorted by
    # name, and the exports list the modules in this order (same bytes either way).
    if isinstance(result.weights, dict):  # codes on disk (a work directory) come in the plan's order already
        order = {n: k for k, n in enumerate(plan.linear_names())}
        result.weights = dict(sorted(result.weights.items(), key=lambda kv: order.get(kv[0], len(order))))
    info = getattr(calib, "info", None)  # the record keeps its source; the exports name no local path
    recipe_dict = asdict(recipe) if method != "rtn" else None
    if recipe_dict is not None and result.weight_grad:
        recipe_dict["weight_grad"] = result.weight_grad
    meta = {
        "variant": name,
        "method": method,
        "recipe": recipe_dict,
        "calibration": public_calibration(asdict(info)) if info else None,
        "hubtool_version": __version__,
        "block_lists": plan.block_lists,
        "quantized": sorted(result.weights),
        "skipped": [s.name for s in plan.skipped + result.skipped],
        "source": public_path(source_name),
    }
    return QuantizedVariant(result, info, recipe_dict, meta)


def _quantize_variant(
    opts,
    loaded,
    plan,
    spec,
    method,
    recipe,
    formats,
    vname,
    calib_source,
    run_dir: Path,
    single: bool,
    progress,
    calib=None,
    resume: bool = False,
    head: str | None = None,
) -> rec.VariantRecord:
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    q = quantize_variant(
        loaded.model,
        loaded.processor,
        plan,
        spec,
        method,
        recipe,
        calib_source,
        name=vname,
        source_name=loaded.info.name,
        is_vlm=loaded.info.is_vlm,
        quantize_vision=opts.quantize_vision,
        device=opts.device,
        device_map=opts.device_map,
        work_dir=run_dir / WORK_DIR / vname,
        resume=resume,
        progress=progress,
        calib=calib,
    )
    variant = rec.VariantRecord(
        name=vname,
        method=method,
        recipe=q.recipe,
        calibration=q.calibration,
        quantized=q.meta["quantized"],
        skipped=plan.skipped + q.result.skipped,
        block_losses=q.result.block_losses,
    )
    for fmt in formats:
        rel = format_dir(vname, fmt, single)
        out = run_dir / rel
        # the head is quantized (RTN, from the 16-bit weights) for the one format that stores it, then freed
        quantized_head = None
        if head is not None and fmt == HEAD_FORMAT:
            quantized_head = quantize_head(loaded.model, head, opts.quantize_lm_head, spec)
        export_format(
            loaded.model,
            loaded.processor,
            q.result.weights,
            spec,
            fmt,
            out,
            q.meta,
            max_shard_size=opts.max_shard_size,
            source_gguf=Path(loaded.info.name) if loaded.info.kind == "gguf" else None,
            head=quantized_head,
        )
        del quantized_head
        if is_gguf(fmt):
            qm = ALL_FORMATS[fmt].quant_method
        else:
            config = json.loads((out / "config.json").read_text())
            qm = config.get("quantization_config", {}).get("quant_method", "")
        fr = rec.FormatRecord(fmt, rel, qm, rec.file_records(out, run_dir))
        if is_gguf(fmt):  # which tensor got which type (the mix, the tuned ones included)
            listing = json.loads((out / "gguf_tensors.json").read_text())
            fr.tensor_types = {t["name"]: t["type"] for t in listing["tensors"]}
        variant.formats.append(fr)
    variant.seconds = time.perf_counter() - t0
    variant.peak_rss_bytes = peak_rss_bytes()
    if torch.cuda.is_available():
        variant.peak_gpu_bytes = torch.cuda.max_memory_allocated()
    return variant


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
