"""optimum integration: ``HubtoolQuantizer`` (an ``optimum.quantization_base.OptimumQuantizer``).

    from hubtool import HubtoolQuantizer
    q = HubtoolQuantizer.from_pretrained("path/or/org-name")
    q.quantize("out", method="rtn", formats=("hubtool",))

It runs the same stages as ``hubtool quantize`` (the same QuantSpec, layer plan, quantizer and
exporter) without a run folder or record. ``REGISTER_COMMANDS`` adds ``optimum-cli hubtool quantize``
when a module in the ``optimum.commands.register`` namespace re-exports it.
"""

from __future__ import annotations

import argparse
import logging
from argparse import ArgumentParser
from pathlib import Path
from typing import Any, get_args, get_origin

import torch
from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum.quantization_base import OptimumQuantizer
from torch import nn

from ..errors import HubtoolError
from ..stages.quantize import check_options, option_fields, option_types, switch_flags, value_flag

log = logging.getLogger(__name__)

# HubtoolQuantizer.quantize takes `hubtool quantize`'s options as keyword arguments (QuantizeOptions
# fields), from_pretrained the LOAD_OPTIONS; no run folder is written, so RUN_FOLDER_OPTIONS do not apply.
LOAD_OPTIONS = ("revision", "dtype", "trust_remote_code")
RUN_FOLDER_OPTIONS = ("source", "run_dir", "overwrite", "resume")
QUANTIZE_OPTIONS = tuple(f.name for f in option_fields() if f.name not in LOAD_OPTIONS + RUN_FOLDER_OPTIONS)
DEFAULTS = {"method": "rtn", "formats": ["hubtool"]}  # where the quantizer's defaults differ from the CLI's


class HubtoolQuantizer(OptimumQuantizer):
    """Quantize a transformers model to int4 (RTN / opt-RTN / SignRound) and export it in hubtool's formats."""

    def __init__(self, model: nn.Module, processor: Any = None, source: Any = None):
        self.model = model
        self.processor = processor
        self.source = source  # hubtool.record.SourceInfo when loaded from a path or Hub id

    @classmethod
    def from_pretrained(
        cls,
        model_or_path: str | Path | nn.Module,
        file_name: str | None = None,
        *,
        processor: Any = None,
        revision: str | None = None,
        dtype: str | torch.dtype = "bfloat16",
        trust_remote_code: bool = False,
    ) -> HubtoolQuantizer:
        """Wrap a loaded model, or load a 16-bit one (Hub id, folder or .gguf) as ``hubtool quantize`` would."""
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path, processor)
        from ..source import load_source, locate, parse_dtype

        source = str(model_or_path)
        if file_name:
            source = str(Path(source) / file_name)
        torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
        info = locate(source, revision=revision, trust_remote_code=trust_remote_code)
        loaded = load_source(info, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        return cls(loaded.model, processor if processor is not None else loaded.processor, loaded.info)

    def quantize(
        self,
        save_dir: str | Path,
        file_prefix: str | None = None,
        *,
        max_shard_size: int | str | None = None,
        **options: Any,
    ) -> dict[str, Path]:
        """Quantize and export; return {format: folder}. One format goes to ``save_dir``, several to ``save_dir/<fmt>``.

        ``options`` are `hubtool quantize`'s (``QUANTIZE_OPTIONS``, e.g. ``method``, ``group_size``,
        ``calib``), checked against QuantizeOptions' fields; an unknown keyword or a value of the wrong
        type is refused. Defaults are `hubtool quantize`'s, except ``DEFAULTS`` (RTN, the hubtool format).
        """
        from ..core.spec import QuantSpec
        from ..formats.export import DEFAULT_MAX_SHARD_SIZE, export_format
        from ..quant.layers import plan_layers
        from ..quant.spec import check_method, make_recipe
        from ..stages.quantize import QuantizeOptions, check_options, parse_formats, quantize_variant

        if file_prefix:
            log.debug("file_prefix %r is ignored: hubtool writes standard model repos", file_prefix)
        opts = QuantizeOptions(
            source=getattr(self.source, "name", ""),
            run_dir=Path(save_dir),
            **{**DEFAULTS, **check_options(options, QUANTIZE_OPTIONS, what="keyword argument")},
        )
        if len(opts.calib) > 1:
            raise HubtoolError(
                f"{len(opts.calib)} calibration sets given; the quantizer makes one int4 variant",
                "pass one calib (`hubtool quantize` makes one variant per set)",
            )
        spec = QuantSpec(bits=opts.bits, group_size=opts.group_size, sym=opts.sym)
        method = check_method(opts.method)
        fmts = parse_formats(opts.formats)
        recipe = make_recipe(
            opts.recipe,
            iters=opts.iters,
            nsamples=opts.nsamples,
            seqlen=opts.seqlen,
            batch_size=opts.batch_size,
            lr=opts.lr,
            seed=opts.seed,
        )
        plan = plan_layers(self.model, spec, quantize_vision=opts.quantize_vision, skip=opts.skip)
        is_vlm = bool(
            getattr(self.source, "is_vlm", False) or getattr(self.model.config, "vision_config", None)
        )
        q = quantize_variant(
            self.model,
            self.processor,
            plan,
            spec,
            method,
            recipe,
            opts.calib[0] if opts.calib else None,
            source_name=opts.source,
            is_vlm=is_vlm,
            quantize_vision=opts.quantize_vision,
            device=opts.device,
            device_map=opts.device_map,
        )
        result, meta = q.result, q.meta
        save_dir = Path(save_dir)
        out: dict[str, Path] = {}
        for fmt in dict.fromkeys(fmts):
            folder = save_dir if len(fmts) == 1 else save_dir / fmt
            export_format(
                self.model,
                self.processor,
                result.weights,
                spec,
                fmt,
                folder,
                meta,
                max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE,
            )
            out[fmt] = folder
        return out


class HubtoolQuantizeCommand(BaseOptimumCLICommand):
    """``optimum-cli hubtool quantize SOURCE -o DIR``: the Optimum face of ``hubtool quantize`` (no run record)."""

    COMMAND = CommandInfo(name="quantize", help="Quantize a model to int4 with hubtool and export it.")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        """Declare `hubtool quantize`'s options, from QuantizeOptions' fields (no run folder: -o is the output)."""
        parser.add_argument("source", help="Hub id, local model folder or .gguf file")
        parser.add_argument("-o", "--output", required=True, help="output folder")
        types = option_types()
        for f in option_fields():
            if f.name not in QUANTIZE_OPTIONS + LOAD_OPTIONS:
                continue
            text = f.metadata["help"] + (f" (default: {DEFAULTS[f.name]})" if f.name in DEFAULTS else "")
            if types[f.name] is bool:
                on, off = switch_flags(f)
                parser.add_argument(
                    on, dest=f.name, action="store_const", const=True, default=None, help=text
                )
                parser.add_argument(
                    off, dest=f.name, action="store_const", const=False, help=argparse.SUPPRESS
                )
            elif get_origin(types[f.name]) is list and not f.metadata["sep"]:
                parser.add_argument(value_flag(f), dest=f.name, action="append", help=text)
            else:
                kind = next((t for t in get_args(types[f.name]) if t is not type(None)), types[f.name])
                kind = kind if kind in (int, float) else str
                parser.add_argument(value_flag(f), dest=f.name, type=kind, help=text)

    def run(self) -> None:
        """Run the quantization; a HubtoolError ends with its one line and exit code 2."""
        import sys

        a = vars(self.args)
        try:
            values = check_options({k: a.get(k) for k in QUANTIZE_OPTIONS + LOAD_OPTIONS})
            load = {k: values.pop(k) for k in LOAD_OPTIONS if k in values}
            q = HubtoolQuantizer.from_pretrained(a["source"], **load)
            written = q.quantize(a["output"], **values)
        except HubtoolError as exc:
            sys.stderr.write(exc.line() + "\n")
            raise SystemExit(exc.exit_code) from None
        for fmt, folder in written.items():
            sys.stdout.write(f"{fmt}: {folder}\n")


class HubtoolCommand(BaseOptimumCLICommand):
    """``optimum-cli hubtool``: groups hubtool's subcommands."""

    COMMAND = CommandInfo(name="hubtool", help="int4 quantization with hubtool")
    SUBCOMMANDS = (
        CommandInfo(
            name="quantize", help=HubtoolQuantizeCommand.COMMAND.help, subcommand_class=HubtoolQuantizeCommand
        ),
    )


# optimum-cli imports every module of the `optimum.commands.register` namespace package and registers
# the commands in its REGISTER_COMMANDS; a one-line module there re-exports this list.
REGISTER_COMMANDS: list[Any] = [HubtoolCommand]
