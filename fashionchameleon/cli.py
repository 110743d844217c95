"""`python -m fashionchameleon generate|bench|eval|convert|train`: thin wrappers over the engine and the trainer.

Bad user input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from .engine import DEFAULT_CHUNKS, StreamingEngine, SwitchMode
from .errors import UserInputError
from .presets import DEFAULT_PRESET, PRESETS

logger = logging.getLogger("fashionchameleon")


def _switch(value: str) -> tuple[int, str]:
    chunk, sep, path = value.partition(":")
    if not sep or not chunk.isdigit() or int(chunk) < 1 or not path:
        raise argparse.ArgumentTypeError(f"--switch wants K:IMAGE with K >= 1 (a chunk index), got {value!r}")
    return int(chunk), path


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {value!r}")
    return seconds


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not the usage block) with exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m fashionchameleon", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of: {', '.join(PRESETS)}")
        p.add_argument("--checkpoint", help="FashionChameleon weights: model.pt, .safetensors or a saved folder")
        p.add_argument("--base", help="diffusers Wan2.2-TI2V-5B folder or hub id (wan22-ti2v-5b)")
        p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
        p.add_argument("--switch-mode", default=SwitchMode.FULL.value, choices=[mode.value for mode in SwitchMode])

    gen = sub.add_parser("generate", help="write an H.264 mp4 of a streamed try-on video")
    model_args(gen)
    gen.add_argument("--reference", required=True, help="photo of the person")
    gen.add_argument("--garment", required=True, help="photo of the garment")
    gen.add_argument("--prompt", default="", help="motion and scene; garment words are removed")
    gen.add_argument("--chunks", type=_positive, default=DEFAULT_CHUNKS, help="N chunks give 9 + 12(N-1) frames")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--switch", type=_switch, action="append", default=[], metavar="K:IMAGE",
                     help="switch to IMAGE before chunk K (repeatable)")
    gen.add_argument("--output", required=True, help="output .mp4")

    bench = sub.add_parser("bench", help="measure streaming speed and the two baselines in one run")
    model_args(bench)
    bench.add_argument("--random-weights", action="store_true", help="full-size config with random weights")
    bench.add_argument("--chunks", type=_positive, default=40)
    bench.add_argument("--switch-every", type=int, default=0, help="switch garments every K chunks (0: never)")
    bench.add_argument("--baseline-chunks", type=_positive, default=10, help="chunks timed for the recompute baseline")
    bench.add_argument("--bidirectional-steps", type=_positive, help="teacher steps to time (scaled to all steps)")
    bench.add_argument("--height", type=_positive, help="override the preset's frame height (pixels)")
    bench.add_argument("--width", type=_positive, help="override the preset's frame width (pixels)")
    bench.add_argument("--json", help="write the results here")

    conv = sub.add_parser("convert", help="official model.pt -> diffusers transformer folder (safetensors)")
    conv.add_argument("--input", required=True)
    conv.add_argument("--output", required=True)
    conv.add_argument("--preset", default="wan22-ti2v-5b", help="whose transformer config the weights have")

    ev = sub.add_parser("eval", help="score a model on held-out mini wardrobe world clips with a garment switch")
    model_args(ev)
    ev.add_argument("--clips", type=_positive, default=16, help="held-out clips")
    ev.add_argument("--chunks", type=_positive, default=8, help="streamed chunks per clip")
    ev.add_argument("--switch-chunk", type=_positive, default=4, help="switch garments before this chunk")
    ev.add_argument("--modes", default="refresh,refresh+withdraw,full", help="switching modes, comma-separated")
    ev.add_argument("--teacher", help="teacher transformer folder for the teacher-vs-student rows "
                                      "(default: the preset's shipped teacher; 'none' skips them)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--drift-seconds", type=_seconds, default=20.0,
                    help="stream each clip this long without a switch for the drift rows (0: skip them)")
    ev.add_argument("--drift-window", type=_seconds, default=2.0,
                    help="seconds compared at the start and the end of the drift stream")
    ev.add_argument("--json", help="write the results here")
    ev.add_argument("--strip", help="also write a PNG strip of one switch (inputs, streamed frames, ground truth)")
    ev.add_argument("--drift-strip", help="also write a PNG strip of one --drift-seconds stream, a frame every "
                                          "--drift-window seconds, above the ground truth")
    ev.add_argument("--strip-scale", type=_positive, default=4, help="the strips' nearest-neighbour upscale (default 4)")

    from .training.config import STAGES

    train = sub.add_parser("train", help="train a stage (many GPUs: accelerate launch -m fashionchameleon train ...)")
    train.add_argument("stage", choices=["codec", *STAGES, "all"],
                       help="teacher (stage 1), forcing (stage 2), dmd (stage 3), or all of a recipe; codec: the "
                            "mini recipe's learned codec, trained first")
    train.add_argument("--config", required=True,
                       help="YAML/JSON stage config, or a recipe with a section per stage (configs/tiny.yaml)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value of the stage, dotted key and YAML value (repeatable): "
                            "--set reward.kind=world --set output_dir=runs/world")
    return parser


def _load(args: argparse.Namespace):
    from .presets import load_preset

    random_weights = getattr(args, "random_weights", False)
    preset, pipe = load_preset(args.preset, checkpoint=args.checkpoint, device=args.device, base=args.base,
                               random_weights=random_weights)
    if preset.random_weights or random_weights:
        logger.warning("preset %s has random weights: the video is noise by design", preset.name)
    return preset, pipe


def cmd_generate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from . import media

    images = {path: media.load_image(path) for path in [args.reference, args.garment] + [p for _, p in args.switch]}
    switches = dict(args.switch)
    if any(k >= args.chunks for k in switches):
        raise UserInputError(f"--switch chunk indices must be below --chunks ({args.chunks})")
    output = Path(args.output)
    if output.suffix.lower() != ".mp4":
        raise UserInputError(f"--output must end in .mp4, got {args.output}")
    _, pipe = _load(args)
    engine = StreamingEngine(pipe, switch_mode=args.switch_mode)
    stream = engine.start(images[args.reference], images[args.garment], args.prompt, args.seed, chunks=args.chunks)
    if stream.removed_words:
        logger.warning("removed garment words from the prompt: %s", ", ".join(stream.removed_words))
    output.parent.mkdir(parents=True, exist_ok=True)
    with media.VideoWriter(output, fps=pipe.stream.fps) as writer, tqdm(total=args.chunks, unit="chunk") as bar:
        for chunk in stream.play({k: images[path] for k, path in switches.items()}):
            writer.write(chunk.frames)
            bar.update(1)
    print(f"wrote {output} ({writer.frames_written} frames)")


def cmd_bench(args: argparse.Namespace) -> None:
    from . import media
    from .bench import format_table, run_bench

    preset, pipe = _load(args)
    reference_path, garment_paths = preset.example_inputs()
    reference, garments = media.load_image(reference_path), [media.load_image(p) for p in garment_paths]
    sizes = {name: value for name, value in (("height", args.height), ("width", args.width)) if value}
    result = run_bench(pipe, preset.teacher, reference, garments, stream=replace(pipe.stream, **sizes),
                       chunks=args.chunks, switch_every=args.switch_every,
                       baseline_chunks=args.baseline_chunks, bidirectional_steps=args.bidirectional_steps)
    result["preset"] = preset.name
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    from PIL import Image

    from .miniworld.evaluate import EvalConfig, drift_strip, evaluate, example_strip, format_results
    from .models.causal_wan import CausalWanTransformer3DModel
    from .presets import get_preset

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    known = [m.value for m in SwitchMode]
    if not modes or any(m not in known for m in modes):
        raise UserInputError(f"--modes must be a comma-separated subset of {', '.join(known)}, got {args.modes!r}")
    shipped_teacher = get_preset(args.preset).teacher.weights
    teacher_path = args.teacher or (str(shipped_teacher) if shipped_teacher else "none")
    if teacher_path != "none" and not (Path(teacher_path) / "config.json").is_file():
        raise UserInputError(f"--teacher {teacher_path} is not a transformer folder (no config.json)")
    config = EvalConfig(clips=args.clips, chunks=args.chunks, switch_chunk=args.switch_chunk, modes=modes,
                        seed=args.seed, drift_seconds=args.drift_seconds, drift_window=args.drift_window)
    preset, pipe = _load(args)
    teacher = None
    if teacher_path != "none":
        teacher = CausalWanTransformer3DModel.from_pretrained(teacher_path, dtype=pipe.transformer.dtype)
        teacher = teacher.to(pipe.device)
    result = evaluate(pipe, config, teacher=teacher, sampling=preset.teacher, progress=True)
    result["preset"] = preset.name
    print(format_results(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    strips = {args.strip: lambda: example_strip(pipe, chunks=args.chunks, switch_chunk=args.switch_chunk,
                                                seed=args.seed),
              args.drift_strip: lambda: drift_strip(pipe, seconds=args.drift_seconds or 20.0,
                                                    every_seconds=args.drift_window, seed=args.seed)}
    for path, make in strips.items():
        if path:
            strip = Image.fromarray(make())
            strip.resize((strip.width * args.strip_scale, strip.height * args.strip_scale), Image.NEAREST).save(path)


def cmd_convert(args: argparse.Namespace) -> None:
    from accelerate import init_empty_weights

    from .models.causal_wan import CausalWanTransformer3DModel
    from .models.convert import load_official_checkpoint
    from .presets import get_preset

    config = get_preset(args.preset).transformer
    state = load_official_checkpoint(args.input)
    with init_empty_weights():
        model = CausalWanTransformer3DModel(**config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise UserInputError(f"{args.input} does not match the {args.preset} transformer: {first}") from None
    model.save_pretrained(args.output)
    print(f"wrote {args.output}")


def cmd_train(args: argparse.Namespace) -> None:
    from .training.codec import train_codec
    from .training.config import parse_overrides, with_overrides
    from .training.recipe import codec_config, load_recipe, run_recipe, stage_config
    from .training.trainer import Trainer

    overrides = parse_overrides(args.set)
    if args.stage == "codec":
        config = codec_config(load_recipe(args.config)[0], overrides)
        if config is None:
            raise UserInputError(f"{args.config} has no codec section")
        folder = train_codec(config)
    elif args.stage == "all":
        if overrides:
            raise UserInputError("--set applies to one stage: name it (teacher, forcing or dmd) instead of all")
        folder = run_recipe(args.config)
    else:
        folder = Trainer(with_overrides(stage_config(args.config, args.stage), overrides)).train()
    logger.info("trained %s: %s", args.stage, folder)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        {"generate": cmd_generate, "bench": cmd_bench, "eval": cmd_eval, "convert": cmd_convert,
         "train": cmd_train}[args.command](args)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
