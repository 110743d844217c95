"""Training triplets (video, reference image, garment image, caption) from disk, raw or pre-encoded (docs/method.md §2).

Two layouts on disk:

- `authors`: `meta_train.csv` with columns `video` (path to `X.mp4`), `prompt` (JSON; `en_long` = [dynamic,
  static]), `width`, `height`; the reference `X_src.png` and the garment `X_cloth.png` lie beside `X.mp4`.
- `folder`: one folder per clip holding `video.mp4`, `reference.png`, `garment.png` and `prompt.json`
  (`{"dynamic": ..., "static": ...}`); the folder name is the clip's id.

Frames and the reference are resized to cover the frame and centre-cropped, the garment is letterboxed on white
(the same `media` helpers the engine uses). A sample whose files are missing or unreadable is skipped with a
warning, never fatal. The optional `LatentCache` holds VAE latents and UMT5 embeddings so that training steps run
neither; it is filled before training by `LatentCache.build`.

Randomness (caption choice) depends only on (seed, draw number), and `DrawSampler` derives each draw's sample from
(seed, epoch), so a resumed run reads exactly the samples and captions the uninterrupted run would have read.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import media
from ..errors import UserInputError
from ..rollout import StreamConfig
from .config import DataConfig

logger = logging.getLogger(__name__)

# Files of the `folder` layout.
FOLDER_VIDEO, FOLDER_REFERENCE, FOLDER_GARMENT, FOLDER_PROMPT = "video.mp4", "reference.png", "garment.png", \
    "prompt.json"
# Siblings of `X.mp4` in the authors' layout.
AUTHORS_REFERENCE_SUFFIX, AUTHORS_GARMENT_SUFFIX = "_src.png", "_cloth.png"
# What a broken sample raises while it is read (decoders, PIL, our own checks, safetensors).
SAMPLE_ERRORS = (OSError, ValueError, RuntimeError, av.error.FFmpegError, SafetensorError)


@dataclass(frozen=True)
class Triplet:
    """One training clip: where its files are and its caption halves."""

    id: str
    video: Path
    reference: Path
    garment: Path
    dynamic: str  # motion, expression, camera
    static: str  # appearance, clothing, scene, style

    @property
    def long_caption(self) -> str:
        return f"{self.dynamic} {self.static}".strip()

    def caption_variants(self) -> tuple[str, ...]:
        """Every prompt training can pick for this clip (the cache encodes each once)."""
        return tuple(dict.fromkeys((self.dynamic, self.long_caption, "")))


def drop_garment(item: dict[str, Any], config: DataConfig, stream: StreamConfig,
                 rng: np.random.Generator) -> dict[str, Any]:
    """With `garment_drop_prob`, show the blank garment canvas instead of the garment (garment guidance's
    unconditional branch, as the empty prompt is the text's)."""
    if rng.random() < config.garment_drop_prob:
        item["garment"] = media.image_to_tensor(media.blank_garment(stream.width, stream.height))
    return item


def choose_caption(triplet: Triplet, config: DataConfig, rng: np.random.Generator) -> str:
    """Mixed captions (docs/method.md §2.4): the dynamic part alone with `short_caption_prob`, else dynamic + static;
    then the empty prompt with `empty_prompt_prob` (the teacher's unconditional branch)."""
    short, empty = rng.random(2)
    caption = triplet.dynamic if config.mixed_captions and short < config.short_caption_prob else triplet.long_caption
    return "" if empty < config.empty_prompt_prob else caption


# -- discovering samples -------------------------------------------------------------------------------------
def discover_triplets(config: DataConfig) -> list[Triplet]:
    """All samples of the dataset whose files exist; the others are reported once and left out."""
    root = Path(config.root)
    if not root.is_dir():
        raise UserInputError(f"data.root {root} is not a folder")
    if config.layout == "authors":
        found = _authors_triplets(root, config)
    elif config.layout == "folder":
        found = _folder_triplets(root)
    else:
        raise UserInputError(f"data.layout must be 'authors' or 'folder', got {config.layout!r}")
    kept = []
    for triplet in found:
        missing = [p for p in (triplet.video, triplet.reference, triplet.garment) if not p.is_file()]
        if missing:
            logger.warning("skipping sample %s: missing %s", triplet.id, ", ".join(str(p) for p in missing))
        else:
            kept.append(triplet)
    if not kept:
        raise UserInputError(f"no usable training samples under {root} (layout {config.layout!r})")
    logger.info("%d training samples under %s (%d skipped)", len(kept), root, len(found) - len(kept))
    return kept


def _authors_triplets(root: Path, config: DataConfig) -> list[Triplet]:
    meta = root / config.meta_file
    if not meta.is_file():
        raise UserInputError(f"{meta} does not exist (data.layout 'authors' reads data.meta_file in data.root)")
    video_root = Path(config.video_root) if config.video_root else root
    triplets = []
    with meta.open(newline="", encoding="utf-8") as handle:
        for row_number, row in enumerate(csv.DictReader(handle), start=2):
            video = row.get("video") or ""
            try:
                dynamic, static = _caption_halves(json.loads(row.get("prompt") or ""), config.caption_key)
            except (ValueError, TypeError) as error:
                logger.warning("skipping %s line %d (%s): bad prompt JSON (%s)", meta.name, row_number, video, error)
                continue
            path = video_root / video
            stem = path.with_suffix("")
            triplets.append(Triplet(video, path, Path(f"{stem}{AUTHORS_REFERENCE_SUFFIX}"),
                                    Path(f"{stem}{AUTHORS_GARMENT_SUFFIX}"), dynamic, static))
    return triplets


def _caption_halves(prompt: dict[str, Any], key: str) -> tuple[str, str]:
    """[dynamic, static] under `key`, else under the first other variant present (the authors' `complete_fields`)."""
    if not isinstance(prompt, dict):
        raise TypeError("prompt is not a JSON object")
    for name in (key, "en_long", "en_short", "cn_long", "cn_short"):
        value = prompt.get(name)
        if isinstance(value, str):
            return value.strip(), ""
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value[0].strip(), " ".join(v.strip() for v in value[1:]).strip()
    raise ValueError(f"no caption under {key!r} or another variant")


def _folder_triplets(root: Path) -> list[Triplet]:
    triplets = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            prompt = json.loads((folder / FOLDER_PROMPT).read_text(encoding="utf-8"))
            dynamic, static = str(prompt.get("dynamic", "")).strip(), str(prompt.get("static", "")).strip()
        except (OSError, ValueError, AttributeError) as error:
            logger.warning("skipping sample %s: unreadable %s (%s)", folder.name, FOLDER_PROMPT, error)
            continue
        triplets.append(Triplet(folder.name, folder / FOLDER_VIDEO, folder / FOLDER_REFERENCE, folder / FOLDER_GARMENT,
                                dynamic, static))
    return triplets


# -- reading pixels ----------------------------------------------------------------------------------------
def read_clip(path: Path, num_frames: int, width: int, height: int) -> torch.Tensor:
    """The first `num_frames` frames, each covered + centre-cropped to width x height: [3, F, H, W] in [-1, 1]."""
    frames = []
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        for frame in container.decode(container.streams.video[0]):
            frames.append(media.image_to_tensor(media.fit_reference(frame.to_image(), width, height)))
            if len(frames) == num_frames:
                break
    if len(frames) < num_frames:
        raise ValueError(f"{len(frames)} frames, fewer than data.num_frames = {num_frames}")
    return torch.stack(frames, dim=1)


def load_pixels(triplet: Triplet, config: DataConfig, stream: StreamConfig,
                load_video: bool) -> dict[str, torch.Tensor]:
    """reference [3, H, W] (fit/crop), garment [3, H, W] (letterboxed on white), video [3, F, H, W] if asked, at the
    stream's frame size."""
    size = (stream.width, stream.height)
    out = {
        "reference": media.image_to_tensor(media.fit_reference(media.load_image(triplet.reference), *size)),
        "garment": media.image_to_tensor(media.letterbox_garment(media.load_image(triplet.garment), *size)),
    }
    if load_video:
        out["video"] = read_clip(triplet.video, config.num_frames, *size)
    return out


# -- the pre-encoded cache ---------------------------------------------------------------------------------
class LatentCache:
    """VAE latents per clip and UMT5 embeddings per prompt, as safetensors files in one folder.

    `samples/<hash of id>.safetensors`: reference_latent, garment_latent [C, 1, h, w], video_latent [C, F, h, w].
    `text/<hash of prompt>.safetensors`: embeds [n, D], the prompt's rows only (UMT5 rows past the prompt's length
    are exactly zero, so they are re-padded on load). `meta.json` records the sizes the cache was built for.
    """

    def __init__(self, root: str | Path, config: DataConfig, stream: StreamConfig) -> None:
        self.root = Path(root)
        self.max_text_tokens = stream.max_text_tokens
        self.meta = {"height": stream.height, "width": stream.width, "num_frames": config.num_frames}
        meta_path = self.root / "meta.json"
        if meta_path.is_file():
            found = json.loads(meta_path.read_text())
            if found != self.meta:
                raise UserInputError(f"latent cache {self.root} was built for {found}, the config asks for "
                                     f"{self.meta}; point data.latent_cache at a new folder")

    def sample_path(self, triplet: Triplet) -> Path:
        return self.root / "samples" / f"{_digest(triplet.id)}.safetensors"

    def text_path(self, prompt: str) -> Path:
        return self.root / "text" / f"{_digest(prompt)}.safetensors"

    def load_sample(self, triplet: Triplet, load_video: bool) -> dict[str, torch.Tensor]:
        tensors = load_file(self.sample_path(triplet))
        if not load_video:
            tensors.pop("video_latent")
        return tensors

    def load_text(self, prompt: str) -> torch.Tensor:
        """[max_text_tokens, D] embeddings of `prompt`, zero rows past its length."""
        path = self.text_path(prompt)
        if not path.is_file():
            raise UserInputError(f"prompt {prompt[:40]!r} is not in the latent cache {self.root}; rebuild it")
        rows = load_file(path)["embeds"]
        return torch.cat([rows, rows.new_zeros(self.max_text_tokens - rows.shape[0], rows.shape[1])])

    @staticmethod
    def prompts(triplets: list[Triplet], extra_prompts: list[str]) -> list[str]:
        """Every prompt a run can embed: each clip's caption variants and the stage's own (e.g. the negative)."""
        return list(dict.fromkeys([*extra_prompts, *(p for t in triplets for p in t.caption_variants())]))

    def has_text(self, prompts: list[str]) -> bool:
        """Whether every prompt is encoded already (then UMT5 need not even be loaded)."""
        return all(self.text_path(prompt).is_file() for prompt in prompts)

    @torch.no_grad()
    def build(self, triplets: list[Triplet], config: DataConfig, stream: StreamConfig, codec, prompt_encoder,
              prompts: list[str],
              *, rank: int = 0, world: int = 1, progress: bool = True) -> None:
        """Encode what is missing (`prompt_encoder` may be None when `has_text(prompts)`); process `rank` of
        `world` takes every world-th item. Broken clips are skipped with a warning (and again in training)."""
        from tqdm import tqdm

        (self.root / "samples").mkdir(parents=True, exist_ok=True)
        (self.root / "text").mkdir(parents=True, exist_ok=True)
        if rank == 0:
            (self.root / "meta.json").write_text(json.dumps(self.meta))
        for prompt in tqdm(prompts[rank::world], desc="cache prompts", disable=not progress):
            path = self.text_path(prompt)
            if not path.is_file():
                embeds = prompt_encoder.encode(prompt)[0]
                length = int((embeds.abs().amax(dim=-1) > 0).nonzero().max()) + 1 if embeds.any() else 1
                _save_atomic({"embeds": embeds[:length].contiguous().cpu()}, path)
        for triplet in tqdm(triplets[rank::world], desc="cache latents", disable=not progress):
            path = self.sample_path(triplet)
            if path.is_file():
                continue
            try:
                pixels = load_pixels(triplet, config, stream, load_video=True)
            except SAMPLE_ERRORS as error:
                logger.warning("not caching sample %s: %s", triplet.id, error)
                continue
            device = codec.vae.device
            _save_atomic({
                "reference_latent": codec.encode_image(pixels["reference"][None].to(device))[0].cpu(),
                "garment_latent": codec.encode_image(pixels["garment"][None].to(device))[0].cpu(),
                "video_latent": codec.encode_video(pixels["video"][None].to(device))[0].cpu(),
            }, path)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:24]


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write then rename, so a killed build never leaves a truncated entry that looks complete."""
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, tmp)
    tmp.replace(path)


# -- dataset, sampler, collate -----------------------------------------------------------------------------
class TripletDataset(torch.utils.data.Dataset):
    """Items are looked up by (draw, index): the draw number seeds the caption choice, the index picks the clip.

    An item is a dict with `draw`, and unless the sample is broken `prompt`, `clip` (the index, a 0-d int64
    tensor, so that collating stacks it like the pixels) plus either pixels (`reference`, `garment`, `video`) or,
    with a cache, latents (`reference_latent`, `garment_latent`, `video_latent`) and `text` [max_text_tokens, D].
    `load_video=False` (data-free DMD) skips the clip itself.
    """

    def __init__(self, triplets: list[Triplet], config: DataConfig, stream: StreamConfig, *, seed: int,
                 load_video: bool, cache: LatentCache | None = None) -> None:
        self.triplets = triplets
        self.config, self.stream = config, stream
        self.seed = seed
        self.load_video = load_video
        self.cache = cache
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        draw, index = key
        triplet = self.triplets[index]
        rng = np.random.default_rng([self.seed, draw])
        prompt = choose_caption(triplet, self.config, rng)
        try:
            if self.cache is None:
                tensors = load_pixels(triplet, self.config, self.stream, self.load_video)
            else:
                tensors = {**self.cache.load_sample(triplet, self.load_video), "text": self.cache.load_text(prompt)}
        except SAMPLE_ERRORS as error:
            if triplet.id not in self._reported:  # once per sample (and worker), not once per epoch
                self._reported.add(triplet.id)
                logger.warning("skipping broken sample %s: %s", triplet.id, error)
            return {"draw": draw}
        return drop_garment({"draw": draw, "prompt": prompt, "clip": torch.tensor(index), **tensors}, self.config,
                            self.stream, rng)


class MiniWorldDataset(torch.utils.data.Dataset):
    """`layout: miniworld`: clip `index` is `miniworld.make_triplet(index)` drawn at the stream size, so the dataset
    needs no files and a seed reproduces every sample; items are `TripletDataset`'s (pixels, empty prompt: the
    world has no captions), and their `clip` is the seed that rebuilds the sample's truth (the world reward)."""

    def __init__(self, config: DataConfig, stream: StreamConfig, *, seed: int, load_video: bool) -> None:
        if config.clips < 1:
            raise UserInputError(f"data.clips must be >= 1, got {config.clips}")
        self.config, self.stream, self.seed, self.load_video = config, stream, seed, load_video

    def __len__(self) -> int:
        return self.config.clips

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        from ..miniworld import make_triplet

        draw, index = key
        config = self.config
        stream = self.stream
        triplet = make_triplet(index, config.num_frames if self.load_video else 1, stream.height, stream.width)
        item = {"draw": draw, "prompt": "", "clip": torch.tensor(index),
                "reference": media.image_to_tensor(triplet.reference),
                "garment": media.image_to_tensor(triplet.garment_image)}
        if self.load_video:
            item["video"] = torch.stack([media.image_to_tensor(frame) for frame in triplet.video], dim=1)
        return drop_garment(item, config, stream, np.random.default_rng([self.seed, draw]))


def build_dataset(config: DataConfig, stream: StreamConfig, *, seed: int, load_video: bool,
                  cache: "LatentCache | None",
                  stage_prompts: list[str]) -> tuple[torch.utils.data.Dataset, list[Triplet], list[str]]:
    """(dataset, its on-disk triplets, every prompt the run embeds) for `config.layout`."""
    if config.layout == "miniworld":
        if cache is not None:
            raise UserInputError("data.layout 'miniworld' draws samples on the fly: leave data.latent_cache unset")
        dataset = MiniWorldDataset(config, stream, seed=seed, load_video=load_video)
        return dataset, [], list(dict.fromkeys([*stage_prompts, ""]))
    if cache is not None and config.garment_drop_prob:
        raise UserInputError("data.garment_drop_prob needs pixels: it cannot be used with data.latent_cache")
    triplets = discover_triplets(config)
    dataset = TripletDataset(triplets, config, stream, seed=seed, load_video=load_video, cache=cache)
    return dataset, triplets, LatentCache.prompts(triplets, stage_prompts)


class DrawSampler(torch.utils.data.Sampler):
    """Endless (draw, index) pairs. Global draws are numbered across processes: the process starting at
    `first_draw` takes every `world`-th one. Draw g reads position g mod N of the permutation of epoch g div N,
    seeded by (seed, epoch), so any process can start at any draw without replaying earlier ones."""

    def __init__(self, size: int, seed: int, *, first_draw: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.first_draw, self.world = size, seed, first_draw, world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, order = -1, None
        draw = self.first_draw
        while True:
            if draw // self.size != epoch:
                epoch = draw // self.size
                order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            yield draw, int(order[draw % self.size])
            draw += self.world


def collate_triplets(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good items; `draws` lists every item (broken ones too) so the run can record what it consumed."""
    good = [item for item in items if "prompt" in item]
    batch: dict[str, Any] = {"draws": [item["draw"] for item in items], "prompts": [item["prompt"] for item in good]}
    if good:
        for key in good[0].keys() - {"draw", "prompt"}:
            batch[key] = torch.stack([item[key] for item in good])
    return batch
