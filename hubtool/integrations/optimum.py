"""optimum integration: ``HubtoolQuantizer`` (an ``optimum.quantization_base.OptimumQuantizer``).

    from hubtool import HubtoolQuantizer
    q = HubtoolQuantizer.from_pretrained("path/or/org-name")
    q.quantize("out", method="rtn", formats=("hubtool",))

It runs the same stages as ``hubtool quantize`` (the same QuantSpec, layer plan, quantizer and
exporter) without a run folder or record. ``REGISTER_COMMANDS`` adds ``optimum-cli hubtool quantize``
when a module in the ``optimum.commands.register`` namespace re-exports it.
"""

from __future__ import annotations

import logging
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

import torch
from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum.quantization_base import OptimumQuantizer
from torch import nn

from ..errors import HubtoolError
from ..formats.table import FORMATS

log = logging.getLogger(__name__)


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
        bits: int = 4,
        group_size: int = 128,
        sym: bool = True,
        method: str = "rtn",
        formats: tuple[str, ...] | list[str] | str = ("hubtool",),
        recipe: str = "default",
        iters: int | None = None,
        nsamples: int | None = None,
        seqlen: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        calib: str | None = None,
        quantize_vision: bool = False,
        skip: str | None = None,
        device: str = "cpu",
        max_shard_size: int | str | None = None,
    ) -> dict[str, Path]:
        """Quantize and export; return {format: folder}. One format goes to ``save_dir``, several to ``save_dir/<fmt>``."""
        from ..core.spec import QuantSpec
        from ..formats.export import DEFAULT_MAX_SHARD_SIZE, export_format
        from ..quant.layers import plan_layers
        from ..quant.spec import check_method, make_recipe
        from ..stages.quantize import parse_formats, quantize_variant

        if file_prefix:
            log.debug("file_prefix %r is ignored: hubtool writes standard model repos", file_prefix)
        spec = QuantSpec(bits=bits, group_size=group_size, sym=sym)
        method = check_method(method)
        fmts = parse_formats(formats)
        rec = make_recipe(recipe, iters=iters, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, lr=lr)
        plan = plan_layers(self.model, spec, quantize_vision=quantize_vision, skip=skip)
        is_vlm = bool(
            getattr(self.source, "is_vlm", False) or getattr(self.model.config, "vision_config", None)
        )
        q = quantize_variant(
            self.model,
            self.processor,
            plan,
            spec,
            method,
            rec,
            calib,
            source_name=getattr(self.source, "name", ""),
            is_vlm=is_vlm,
            quantize_vision=quantize_vision,
            device=device,
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
        """Declare the options (a subset of `hubtool quantize`'s)."""
        parser.add_argument("source", help="Hub id, local model folder or .gguf file")
        parser.add_argument("-o", "--output", required=True, help="output folder")
        parser.add_argument("--method", default="rtn", help="rtn, opt-rtn or signround")
        parser.add_argument("--group-size", type=int, default=128)
        parser.add_argument("--asym", action="store_true", help="asymmetric (default symmetric)")
        parser.add_argument("--formats", default="hubtool", help="comma-separated: " + ",".join(FORMATS))
        parser.add_argument("--recipe", default="default")
        parser.add_argument("--calib", default=None, help="calibration set (default: builtin)")
        parser.add_argument("--revision", default=None)
        parser.add_argument("--dtype", default="bfloat16")
        parser.add_argument("--trust-remote-code", action="store_true")

    def run(self) -> None:
        """Run the quantization; a HubtoolError ends with its one line and exit code 2."""
        import sys

        a = self.args
        try:
            q = HubtoolQuantizer.from_pretrained(
                a.source, revision=a.revision, dtype=a.dtype, trust_remote_code=a.trust_remote_code
            )
            written = q.quantize(
                a.output,
                method=a.method,
                group_size=a.group_size,
                sym=not a.asym,
                formats=a.formats,
                recipe=a.recipe,
                calib=a.calib,
            )
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
