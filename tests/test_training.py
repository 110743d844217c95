"""Training on the tiny preset (CPU, seconds): the teacher-forcing mask, GR-DMD's weights and loss, configs, data,
and the three stages end to end (each lowers its loss on one fixed batch, a killed run resumes bit-exactly, the
stage-3 student streams in the engine)."""

import csv
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import GARMENTS, REFERENCE, TINY_TRANSFORMER, caption, write_world_dataset

from fashionchameleon import media
from fashionchameleon.cli import main as cli_main
from fashionchameleon.engine import StreamingEngine
from fashionchameleon.errors import UserInputError
from fashionchameleon.miniworld import make_triplet
from fashionchameleon.miniworld.world import WHITE
from fashionchameleon.models.causal_wan import (
    CausalWanTransformer3DModel,
    teacher_forcing_block_mask,
    teacher_forcing_mask,
)
from fashionchameleon.models.kv_cache import KVSlot, WindowPolicy
from fashionchameleon.presets import get_preset, load_preset
from fashionchameleon.rollout import Rollout
from fashionchameleon.training.config import (
    STAGES,
    DataConfig,
    RewardConfig,
    config_from_dict,
    load_config,
    parse_overrides,
    with_overrides,
)
from fashionchameleon.training.data import (
    DrawSampler,
    LatentCache,
    TripletDataset,
    choose_caption,
    collate_triplets,
    discover_triplets,
    load_pixels,
)
from fashionchameleon.training.losses import Batch, Rngs, chunk_ids, gr_dmd_loss
from fashionchameleon.training.recipe import codec_config, load_recipe, stage_config
from fashionchameleon.training.reward import (
    AestheticHead,
    WorldReward,
    build_reward,
    chunk_weights,
    tiny_aesthetic_reward,
)
from fashionchameleon.training.trainer import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
#: The training tests run at the tiny recipe's size (64x32 frames, chunks of 2 latent frames, 16 text tokens).
STREAM = load_recipe(CONFIGS / "tiny.yaml")[0]["shared"]["stream"]
TINY_STREAM = replace(get_preset("tiny").stream, **STREAM)


# -- the in-context teacher-forcing mask (docs/method.md §3.2) -----------------------------------------------------
def test_teacher_forcing_mask_is_the_papers_toy_figure():
    """The 8 x 8 toy of the paper's framework figure: 1-frame chunks, 2 video frames, one token per frame.
    Order: clean src, gar, v1, v2, then noisy src, gar, v1, v2."""
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(teacher_forcing_mask(chunk_ids(2, 2, 1), 1), expected)


def test_teacher_forcing_mask_every_pair_follows_the_method_table():
    """3 chunks of 2 frames, 3 tokens per frame: each token's allowed keys written out from the §3.2 table."""
    chunk_frames, chunks, tokens = 2, 3, 3
    frames = 2 + chunk_frames * chunks

    def describe(token):  # -> (noisy?, kind, chunk index or None)
        half, index = divmod(token, frames * tokens)
        frame = index // tokens
        return bool(half), ("cond" if frame < 2 else "video"), (None if frame < 2 else (frame - 2) // chunk_frames)

    def allowed(query, key):
        q_noisy, q_kind, q_chunk = describe(query)
        k_noisy, k_kind, k_chunk = describe(key)
        if not q_noisy and q_kind == "cond":  # clean src/gar: each other only
            return not k_noisy and k_kind == "cond"
        if not q_noisy:  # clean chunk j: clean src/gar and clean chunks 0..j
            return not k_noisy and (k_kind == "cond" or k_chunk <= q_chunk)
        if q_kind == "cond":  # noisy src/gar: only themselves
            return k_noisy and k_kind == "cond"
        if k_noisy:  # noisy chunk j: its own noisy chunk ...
            return k_kind == "video" and k_chunk == q_chunk
        return k_kind == "cond" or k_chunk < q_chunk  # ... and clean src/gar + clean chunks before j

    length = 2 * frames * tokens
    expected = torch.tensor([[allowed(q, k) for k in range(length)] for q in range(length)])
    mask = teacher_forcing_mask(chunk_ids(2, chunk_frames * chunks, chunk_frames), tokens)
    assert mask.shape == (length, length)
    assert torch.equal(mask, expected)
    block = teacher_forcing_block_mask(chunk_ids(2, chunk_frames * chunks, chunk_frames), tokens)
    index = torch.arange(length)
    assert torch.equal(block.mask_mod(None, None, index[:, None], index[None, :]), expected)


def test_teacher_forcing_forward_equals_the_streaming_student(tiny_transformer):
    """The noisy half under the §3.2 mask sees exactly what the streaming student sees: the output for noisy
    chunk 1 equals a KV-cached stream (prefill, commit clean chunk 0 at t = 0, query chunk 1 read-only)."""
    model, cf, h, w = tiny_transformer, 2, 4, 2
    gen = torch.Generator().manual_seed(0)
    condition, clean, noisy = (torch.randn(1, 48, n, h, w, generator=gen) for n in (2, 2 * cf, 2 * cf))
    text = torch.randn(1, 8, TINY_TRANSFORMER["text_dim"], generator=gen)
    t_noisy = torch.tensor([[624.0] * cf + [832.0] * cf])
    frames = 2 + 2 * cf
    t = torch.cat([torch.zeros(1, frames + 2), t_noisy], dim=1)
    tokens = model.tokens_per_frame(h, w)
    with torch.no_grad():
        full = model(torch.cat([condition, clean, condition, noisy], dim=2), t, text,
                     frame_positions=list(range(frames)) * 2,
                     attention_mask=teacher_forcing_mask(chunk_ids(2, 2 * cf, cf), tokens)).sample
        cache = model.new_kv_cache(1, h, w, policy=WindowPolicy(sink_frames=cf, history_frames=cf))
        model(condition, torch.zeros(1), text, frame_positions=[0, 1], kv_cache=cache,
              cache_write=[KVSlot.REFERENCE, KVSlot.GARMENT], cache_read=())
        model(clean[:, :, :cf], torch.zeros(1), text, frame_positions=[2, 3], kv_cache=cache, cache_write=KVSlot.SINK)
        chunk1 = model(noisy[:, :, cf:], t_noisy[:, cf:], text, frame_positions=[4, 5], kv_cache=cache).sample
        cache.clear(KVSlot.SINK)  # negative control: without the clean context the chunk is different
        alone = model(noisy[:, :, cf:], t_noisy[:, cf:], text, frame_positions=[4, 5], kv_cache=cache).sample
    assert (full[:, :, -cf:] - chunk1).abs().max() < 1e-5
    assert (alone - chunk1).abs().max() > 1e-2


@pytest.mark.filterwarnings("error:flex_attention called without torch.compile")
def test_flex_block_mask_forward_equals_boolean_mask(tiny_transformer):
    """A BlockMask runs compiled FlexAttention (eager flex materialises every score: > 100 GB a layer at 5B; the
    warning that says so is an error here) and equals the exact boolean mask."""
    model = CausalWanTransformer3DModel(**TINY_TRANSFORMER)
    model.load_state_dict(tiny_transformer.state_dict())
    ids, tokens = chunk_ids(2, 4, 2), model.tokens_per_frame(4, 2)
    x = torch.randn(1, 48, 2 * len(ids), 4, 2, generator=torch.Generator().manual_seed(1))
    text = torch.randn(1, 8, TINY_TRANSFORMER["text_dim"])
    t = torch.full((1, 2 * len(ids)), 500.0)
    positions = list(range(len(ids))) * 2
    with torch.no_grad():
        exact = model(x, t, text, frame_positions=positions, attention_mask=teacher_forcing_mask(ids, tokens)).sample
        flex = model(x, t, text, frame_positions=positions,
                     attention_mask=teacher_forcing_block_mask(ids, tokens)).sample
    assert (exact - flex).abs().max() < 1e-4


# -- GR-DMD: chunk weights and the reweighted loss (docs/method.md §4.2-4.3) -------------------------------------------
def weights_of(frame_scores, chunk_frames=2, temperature=0.2):
    return chunk_weights(torch.as_tensor(frame_scores, dtype=torch.float32)[None], temporal_factor=4,
                         chunk_frames=chunk_frames, temperature=temperature)[0]


def test_gr_weights_sum_to_one_and_are_uniform_for_equal_scores():
    scores = torch.rand(3, 1 + 4 * 5, generator=torch.Generator().manual_seed(0)) * 10  # 6 latents = 3 chunks
    weights = chunk_weights(scores, temporal_factor=4, chunk_frames=2, temperature=0.2)
    assert weights.shape == (3, 6)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(weights_of([5.0] * 21), torch.full((6,), 1 / 6, dtype=torch.float64))


def test_gr_weights_favour_low_scoring_chunks_and_follow_the_frame_mapping():
    # 6 latents: latent 0 <- pixel 0, latent f >= 1 <- pixels 4f-3 .. 4f; chunks {0, 1}, {2, 3}, {4, 5}.
    frame_scores = [6.0] + [6.0] * 4 + [4.0] * 8 + [5.0] * 8
    weights = weights_of(frame_scores)
    assert weights[2] == weights[3] and weights[0] == weights[1]  # the unit is the chunk
    assert weights[2] > weights[4] > weights[0]  # lower score, larger weight
    expected = torch.softmax(-torch.tensor([6.0, 4.0, 5.0], dtype=torch.float64) / 0.2, dim=0)
    torch.testing.assert_close(weights, expected.repeat_interleave(2) / 2)
    # Latent 0 takes pixel frame 0 only: a bad first pixel frame lowers chunk 0's score.
    assert weights_of([0.0] + frame_scores[1:])[0] > weights[0]
    with pytest.raises(ValueError):
        weights_of([1.0] * 20)  # not 1 + 4k pixel frames


def test_gr_dmd_with_uniform_weights_is_plain_dmd():
    gen = torch.Generator().manual_seed(0)
    video = torch.randn(2, 4, 6, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    gradient = torch.randn(2, 4, 6, 3, 2, generator=gen, dtype=torch.float64)
    plain = 0.5 * F.mse_loss(video, (video - gradient).detach())
    (plain_grad,) = torch.autograd.grad(plain, video)
    equal_scores = torch.full((2, 1 + 4 * 5), 3.0)
    uniform = gr_dmd_loss(video, gradient, chunk_weights(equal_scores, temporal_factor=4, chunk_frames=2,
                                                         temperature=0.2))
    (uniform_grad,) = torch.autograd.grad(uniform, video)
    torch.testing.assert_close(uniform, plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(uniform_grad, plain_grad, rtol=1e-12, atol=0)
    # Frame f's gradient is A_f g_f / (C h w) / B; a non-uniform A moves it towards the heavy frames.
    weights = torch.softmax(torch.randn(2, 6, generator=gen, dtype=torch.float64), dim=1)
    (weighted_grad,) = torch.autograd.grad(gr_dmd_loss(video, gradient, weights), video)
    torch.testing.assert_close(weighted_grad, weights[:, None, :, None, None] * gradient / (4 * 3 * 2) / 2)
    assert (weighted_grad - plain_grad).abs().max() > 1e-3


def test_self_forcing_rollout_has_gradient_at_the_exit_step_only():
    """The rollout is the streaming core's chunk loop: a prefill, then per chunk the denoising steps up to the shared
    exit step (only that forward records gradients) and a commit pass without gradients."""
    pipe = load_preset("tiny", device="cpu")[1]
    stream = replace(TINY_STREAM, sink_frames=2, history_frames=2)
    sigmas = pipe.student_sigmas(stream.denoising_steps)
    gen = torch.Generator().manual_seed(0)
    reference, garment = (torch.randn(1, 48, 1, 4, 2, generator=gen) for _ in range(2))
    text = torch.randn(1, 16, TINY_TRANSFORMER["text_dim"], generator=gen)
    calls = []

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return pipe.transformer(*args, **kwargs)

    def rollout(exit_step, model=None):
        return Rollout(pipe.transformer, stream, sigmas, reference, garment, text, torch.Generator().manual_seed(1),
                       model=model, exit_step=exit_step).rollout(2)

    video = rollout(2, counting)
    assert video.shape == (1, 48, 4, 4, 2) and video.requires_grad
    assert calls == [False] + [False, False, True, False] * 2  # prefill; steps 0, 1, exit step 2, commit
    video.sum().backward()
    assert pipe.transformer.proj_out.weight.grad is not None
    with torch.no_grad():
        full, last = rollout(None), rollout(3)  # exiting at the last step is the whole 4-step schedule
        early = rollout(1)
    assert torch.equal(full, last) and (full - early).abs().max() > 1e-2


def test_tiny_aesthetic_reward_scores_every_frame_and_loads_released_head_names(tmp_path):
    reward = tiny_aesthetic_reward(seed=0)
    frames = torch.rand(2, 3, 5, 48, 32) * 2 - 1
    scores = reward(frames)
    assert scores.shape == (2, 5) and torch.isfinite(scores).all()
    assert torch.equal(reward(frames), scores)
    # The released LAION head's parameter names: layers.0, 2, 4, 6 and 7.
    names = {name.rsplit(".", 1)[0] for name in AestheticHead().state_dict()}
    assert names == {"layers.0", "layers.2", "layers.4", "layers.6", "layers.7"}


# -- GR-DMD's world reward (the mini wardrobe world's exact quality) ------------------------------------------------
WORLD_CLIP, WORLD_FRAMES = 3, 9  # a training seed of the mini world; 3 chunks of the mini preset


def world_clip(clip: int, height: int = 64, width: int = 48):
    """Truth of a world sample, and the same frames with chunk 1 in the reference's garment colour (the wrong
    garment) and chunk 2's head (face and hair) painted white (the metrics find parts by colour, so the white head
    counts as garment pixels of a wrong colour)."""
    truth = make_triplet(clip, WORLD_FRAMES, height, width)
    corrupted = truth.video.copy()
    corrupted[3:6][truth.masks["garment"][3:6]] = truth.reference_garment.base
    head = truth.masks["face"] | truth.masks["hair"]
    corrupted[6:9][head[6:9]] = WHITE
    return truth, corrupted


def frames_tensor(videos: list[np.ndarray]) -> torch.Tensor:
    """uint8 videos [F, H, W, 3] -> frames [B, 3, F, H, W] in [-1, 1], as the codec decodes them."""
    return torch.stack([torch.stack([media.image_to_tensor(frame) for frame in video], dim=1) for video in videos])


def test_world_reward_scores_truth_high_and_exactly_the_corrupted_frames_lower():
    truth, corrupted = world_clip(WORLD_CLIP)
    batch = Batch(condition=torch.zeros(0), text=torch.zeros(0), clip=torch.tensor([WORLD_CLIP, WORLD_CLIP]))
    scores = WorldReward()(frames_tensor([truth.video, corrupted]), batch)
    assert scores.shape == (2, WORLD_FRAMES) and scores.dtype == torch.float32
    clean, bad = scores
    assert clean.min() > 0.75  # garment fidelity >= 0.5 on truth (patterns alias at 64 px), identity exactly 1
    assert torch.equal(bad[:3], clean[:3])  # untouched frames score exactly as before
    assert (bad[3:6] < clean[3:6] - 0.3).all()  # wrong garment colour
    assert (bad[6:] < clean[6:] - 0.2).all()  # head painted over
    # The person erased is the worst frame of all: identity alone judges its background exact, so without the
    # presence factor it would score 0.5, above the truth through a learned codec (measured 0.19-0.32).
    erased = np.broadcast_to(truth.person.background(*truth.video.shape[1:3]), truth.video.shape).astype(np.uint8)
    (gone,) = WorldReward()(frames_tensor([erased]), replace(batch, clip=batch.clip[:1]))
    assert (gone < 0.05).all()
    # Negative control: the same frames judged as another clip's (another person and garment) score low.
    other = WorldReward()(frames_tensor([truth.video]), replace(batch, clip=torch.tensor([WORLD_CLIP + 1])))
    assert (other[0] < clean - 0.3).all()


def test_world_reward_needs_the_miniworld_layout(workdir):
    with pytest.raises(UserInputError, match="reward.kind 'world' .* needs data.layout 'miniworld', got 'folder'"):
        build_reward(RewardConfig(kind="world"), layout="folder")
    with pytest.raises(UserInputError, match="needs data.layout 'miniworld'"):  # the run is refused as it is built
        Trainer(dmd_config(workdir, "dmd_world_folder", workdir / "base", workdir / "base", reward={"kind": "world"}))
    assert isinstance(build_reward(RewardConfig(kind="world"), layout="miniworld"), WorldReward)


WORLD_ARM = ["reward.kind=world", "output_dir=runs/mini_ablation/world"]  # configs/dmd_mini_ablation.yaml's --set


def test_gr_dmd_step_with_the_world_reward_weights_the_worse_chunk(tmp_path):
    """One generator + critic step of the ablation's GR-DMD arm (configs/dmd_mini_ablation.yaml's, at batch 2), then its
    weights on known frames: a corrupted chunk weighs more, equal frames give exactly plain DMD's weights."""
    config = with_overrides(load_config(CONFIGS / "dmd_mini_ablation.yaml", "dmd"), parse_overrides(WORLD_ARM))
    config = replace(config, output_dir=str(tmp_path / "run"), max_steps=1, batch_size=2, export_pipeline=False,
                     data=replace(config.data, num_workers=0))
    trainer = Trainer(config)
    trainer.train()
    (row,) = read_log(tmp_path / "run" / "loss.csv")
    assert 0 < float(row["generator/reward"]) < 1

    loss, batch = trainer.loss, trainer.next_batch()
    truths = [world_clip(int(clip)) for clip in batch.clip]
    references = torch.stack([media.image_to_tensor(truth.reference) for truth, _ in truths])
    assert torch.equal(batch.condition[:, :, :1], trainer.codec.encode_image(references))  # clip = the sample
    # Through the shipped learned codec the exact metrics see little (they judge colours, and the codec's small colour
    # errors cost the truth about 0.6 of its score): erase the person in sample 0's chunk 1 (the background everywhere).
    videos = [truth.video.copy() for truth, _ in truths]
    videos[0][3:6] = videos[0][3:6, :1, :1]
    latents = trainer.codec.encode_video(frames_tensor(videos))
    weights, reward = loss.frame_weights(latents, batch)
    assert weights[0, 3] > weights[0, 0] and weights[0, 3] > weights[0, 6]  # the erased chunk weighs the most
    decoded_reward = WorldReward()(trainer.codec.decode_video(latents), batch)
    assert torch.equal(weights, chunk_weights(decoded_reward, temporal_factor=1, chunk_frames=3,
                                              temperature=config.reward.temperature))  # the reward of what it decodes
    assert torch.isfinite(reward)
    # Equal scores (every frame the first one) are plain DMD's uniform weights, bit for bit; the equivalence of
    # uniform weights with plain DMD's loss and gradient is test_gr_dmd_with_uniform_weights_is_plain_dmd.
    still = latents[:, :, :1].expand_as(latents)
    equal, _ = loss.frame_weights(still, batch)
    loss.reward = None
    plain, _ = loss.frame_weights(still, batch)
    assert torch.equal(equal, plain)
    assert not torch.equal(weights, plain)


def test_extended_dmd_rollout_streams_through_the_window_and_scores_its_last_clip(tmp_path):
    """`rollout_chunks`: the rollout is the stream a visitor gets (the preset's window, evicting), and DMD sees its
    last clip-length of chunks, with gradient; the paper's rollout (0) is that stream's first chunks."""
    base = load_config(CONFIGS / "dmd_mini_ablation.yaml", "dmd")
    base = replace(base, batch_size=1, export_pipeline=False, data=replace(base.data, num_workers=0))
    extended = Trainer(replace(base, output_dir=str(tmp_path / "extended"), rollout_chunks=5))
    paper = Trainer(replace(base, output_dir=str(tmp_path / "paper"), rollout_chunks=0))
    batch = extended.next_batch()

    def rngs():
        return Rngs(local=torch.Generator().manual_seed(3), shared=torch.Generator().manual_seed(4))

    window, _ = extended.loss.rollout(batch, rngs())
    with torch.no_grad():
        first, _ = paper.loss.rollout(batch, rngs())
        rng = rngs()
        exit_step = int(torch.randint(len(paper.loss.sigmas), (), generator=rng.shared))
        stream = Rollout(paper.loss.generator_module, get_preset("mini").stream, paper.loss.sigmas,
                         batch.condition[:, :, :1], batch.condition[:, :, 1:2], batch.text, rng.local,
                         exit_step=exit_step).rollout(5)
    assert window.shape[2] == first.shape[2] == 9 and window.requires_grad
    assert torch.allclose(window, stream[:, :, 6:], atol=1e-5)  # the stream's chunks 3-5, after eviction began
    assert torch.allclose(first, stream[:, :, :9], atol=1e-5)
    assert (window - first).abs().max() > 0.1  # negative control: not the first chunks


# -- configs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*_*.yaml")), ids=lambda p: p.name)
def test_shipped_stage_configs_load(path):
    stage = path.name.split("_")[0]
    config = load_config(path, stage)
    assert config.stage == stage


@pytest.mark.parametrize("name", ["tiny", "mini", "mini-h200", "mini-2x2"])
def test_shipped_recipes_chain_their_stages(name):
    raw, configs = load_recipe(CONFIGS / f"{name}.yaml")
    assert [config.stage for config in configs] == list(STAGES)
    out = Path(raw["output_dir"])
    assert configs[1].model.init == configs[2].model.teacher == str(out / "teacher" / "transformer")
    # One stage of a recipe is the same config as in the whole run.
    for config in configs:
        assert stage_config(CONFIGS / f"{name}.yaml", config.stage) == config


def test_grdmd_ablation_arms_differ_only_in_the_reward_kind():
    """configs/dmd_mini_ablation.yaml: the shipped recipe's stage 3 from the shipped weights; with the `--set`
    overrides its header names, GR-DMD with the world reward."""
    plain = load_config(CONFIGS / "dmd_mini_ablation.yaml", "dmd")
    world = with_overrides(plain, parse_overrides(WORLD_ARM))
    assert (plain.reward.kind, world.reward.kind) == ("none", "world")
    assert world.reward.temperature == plain.reward.temperature == 0.03  # an override keeps the keys beside it
    assert replace(world, reward=plain.reward, output_dir=plain.output_dir) == plain
    recipe = stage_config(CONFIGS / "mini.yaml", "dmd")
    assert replace(plain, model=recipe.model, output_dir=recipe.output_dir, reward=recipe.reward) == recipe
    assert (plain.model.init, plain.model.teacher, plain.model.codec) == (
        "fashionchameleon/assets/mini/transformer", "fashionchameleon/assets/mini-teacher",
        "fashionchameleon/assets/mini/vae")  # the codec the shipped weights were trained on, not a fresh one


@pytest.mark.parametrize("pairs, message", [(["max_steps"], "KEY=VALUE"), (["reward..kind=x"], "dotted KEY"),
                                            (["reward=1", "reward.kind=x"], "a value and keys at once")])
def test_set_overrides_are_checked(pairs, message):
    with pytest.raises(UserInputError, match=message):
        parse_overrides(pairs)
    plain = load_config(CONFIGS / "dmd_mini_ablation.yaml", "dmd")
    with pytest.raises(UserInputError, match="unknown config key reward.knd"):
        with_overrides(plain, parse_overrides(["reward.knd=world"]))
    assert with_overrides(plain, {}) is plain


def test_5b_configs_hold_the_papers_hyperparameters():
    teacher, forcing, dmd = (load_config(CONFIGS / f"{s}_5b.yaml", s) for s in ("teacher", "forcing", "dmd"))
    assert (teacher.optim.lr, teacher.optim.warmup_steps, teacher.optim.decay_steps, teacher.max_steps) == \
        (1e-5, 200, (1100,), 2300)
    assert teacher.optim.lr_at(1099) == 1e-5 and teacher.optim.lr_at(1100) == 5e-6
    assert (teacher.data.mixed_captions, teacher.data.empty_prompt_prob) == (True, 0.1)
    assert (forcing.optim.lr, forcing.optim.betas, forcing.max_steps, forcing.data.mixed_captions) == \
        (1e-6, (0.0, 0.999), 4000, False)
    assert (dmd.optim.lr, dmd.critic_optim.lr, dmd.generator_every, dmd.guidance_scale, dmd.reward.temperature,
            dmd.ema_decay, dmd.ema_start_step, dmd.data.mixed_captions) == (2e-6, 4e-7, 5, 3.0, 0.2, 0.99, 200, False)
    for config in (teacher, forcing, dmd):
        assert config.batch_size * config.grad_accum * 8 == 64  # the paper's global batch on 8 GPUs
    for stage, cls in STAGES.items():  # the defaults in code are the same paper values
        assert config_from_dict(stage, {}).optim == load_config(CONFIGS / f"{stage}_5b.yaml", stage).optim


def test_config_errors_name_the_bad_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrate: 1.0\n")
    with pytest.raises(UserInputError, match="optim.lrate"):
        load_config(bad, "teacher")
    bad.write_text("stage: dmd\n")
    with pytest.raises(UserInputError, match="'dmd' config"):
        load_config(bad, "teacher")
    with pytest.raises(UserInputError, match="max_steps"):
        config_from_dict("teacher", {"max_steps": "many"})
    assert config_from_dict("teacher", {"optim": {"lr": "1e-4"}}).optim.lr == 1e-4  # YAML 1.1 reads 1e-4 as text


def test_cli_train_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["train", "teacher", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  root: {tmp_path / 'nowhere'}\n")
    assert cli_main(["train", "forcing", "--config", str(config)]) == 2
    assert "nowhere" in capsys.readouterr().err


# -- data -------------------------------------------------------------------------------------------------------
def tiny_data(root, **kw) -> DataConfig:
    return DataConfig(root=str(root), num_frames=9, num_workers=0, **kw)


@pytest.mark.parametrize("layout", ["authors", "folder"])
def test_both_layouts_give_the_same_triplets(tmp_path, layout):
    write_world_dataset(tmp_path, layout=layout, clips=2, frames=9)
    config = tiny_data(tmp_path, layout=layout)
    triplets = discover_triplets(config)
    assert [t.dynamic for t in triplets] == [caption(0), caption(1)]
    assert triplets[0].long_caption == f"{caption(0)} They stand in a plain studio."
    item = TripletDataset(triplets, config, TINY_STREAM, seed=0, load_video=True)[(0, 1)]
    assert item["reference"].shape == (3, 64, 32) and item["garment"].shape == (3, 64, 32)
    assert item["video"].shape == (3, 9, 64, 32)
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    # The garment is letterboxed on white; the reference is cropped, never padded.
    assert torch.all(item["garment"][:, 0] == 1.0) and not torch.all(item["reference"][:, 0] == 1.0)


def test_broken_and_missing_samples_are_skipped_with_a_warning(tmp_path, caplog):
    write_world_dataset(tmp_path, layout="folder", clips=4, frames=9)
    (tmp_path / "clip_000" / "reference.png").unlink()  # missing
    (tmp_path / "clip_001" / "garment.png").write_bytes(b"not a png")  # unreadable
    (tmp_path / "clip_002" / "video.mp4").write_bytes(b"\x00" * 100)  # not a video
    (tmp_path / "clip_003" / "prompt.json").write_text("{")  # bad caption file
    write_world_dataset(tmp_path / "more", layout="folder", clips=1, frames=5)  # too short for 9 frames
    config = tiny_data(tmp_path, layout="folder")
    with caplog.at_level(logging.WARNING):
        triplets = discover_triplets(config)
    assert [t.id for t in triplets] == ["clip_001", "clip_002"]  # "more" has no prompt.json, 000/003 are incomplete
    dataset = TripletDataset(triplets, config, TINY_STREAM, seed=0, load_video=True)
    with caplog.at_level(logging.WARNING):
        batch = collate_triplets([dataset[(0, 0)], dataset[(1, 1)]])
    assert batch["draws"] == [0, 1] and batch["prompts"] == [] and "reference" not in batch
    assert "clip_001" in caplog.text and "clip_002" in caplog.text and "clip_000" in caplog.text
    short = discover_triplets(tiny_data(tmp_path / "more", layout="folder"))
    assert "prompt" not in TripletDataset(short, tiny_data(tmp_path / "more"), TINY_STREAM, seed=0,
                                          load_video=True)[(0, 0)]
    with pytest.raises(UserInputError, match="no usable"):
        discover_triplets(tiny_data(tmp_path / "clip_000", layout="folder"))


def test_caption_mixing_and_empty_prompts_follow_the_config(tmp_path):
    write_world_dataset(tmp_path, layout="authors", clips=1, frames=5)
    (triplet,) = discover_triplets(tiny_data(tmp_path))
    teacher = config_from_dict("teacher", {}).data
    picks = [choose_caption(triplet, teacher, np.random.default_rng([0, draw])) for draw in range(4000)]
    empty = picks.count("") / len(picks)
    short = picks.count(triplet.dynamic) / len(picks)
    assert abs(empty - 0.1) < 0.02 and abs(short - 0.9 * 0.7) < 0.03
    assert set(picks) == {"", triplet.dynamic, triplet.long_caption}
    forcing = config_from_dict("forcing", {}).data
    assert {choose_caption(triplet, forcing, np.random.default_rng([0, d])) for d in range(200)} == \
        {triplet.long_caption}


def test_draw_sampler_resumes_anywhere_and_splits_processes():
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    straight = take(DrawSampler(5, seed=3), 12)
    assert take(DrawSampler(5, seed=3, first_draw=7), 5) == straight[7:]
    assert sorted(i for _, i in straight[:5]) == list(range(5))  # each epoch is a permutation
    ranks = [take(DrawSampler(5, seed=3, first_draw=r, world=2), 6) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == straight


def test_latent_cache_equals_encoding_on_the_fly(tmp_path):
    from fashionchameleon.models.text import PromptEncoder

    write_world_dataset(tmp_path / "data", layout="authors", clips=2, frames=9)
    config = tiny_data(tmp_path / "data")
    triplets = discover_triplets(config)
    pipe = load_preset("tiny", device="cpu")[1]
    codec, encoder = pipe.codec, PromptEncoder(pipe.tokenizer, pipe.text_encoder, TINY_STREAM.max_text_tokens)
    cache = LatentCache(tmp_path / "cache", config, TINY_STREAM)
    cache.build(triplets, config, TINY_STREAM, codec, encoder, LatentCache.prompts(triplets, ["", "negative"]),
                progress=False)
    cached = TripletDataset(triplets, config, TINY_STREAM, seed=0, load_video=True, cache=cache)[(5, 1)]
    raw = TripletDataset(triplets, config, TINY_STREAM, seed=0, load_video=True)[(5, 1)]
    assert cached["prompt"] == raw["prompt"]
    assert torch.equal(cached["reference_latent"], codec.encode_image(raw["reference"][None])[0])
    assert torch.equal(cached["garment_latent"], codec.encode_image(raw["garment"][None])[0])
    assert torch.equal(cached["video_latent"], codec.encode_video(raw["video"][None])[0])
    assert torch.equal(cached["text"], encoder.encode(raw["prompt"])[0])
    assert torch.equal(cache.load_text("negative"), encoder.encode("negative")[0])
    with pytest.raises(UserInputError, match="built for"):
        LatentCache(tmp_path / "cache", config, replace(TINY_STREAM, height=32))
    assert "video_latent" not in TripletDataset(triplets, config, TINY_STREAM, seed=0, load_video=False,
                                                cache=cache)[(0, 0)]


def test_load_pixels_fit_and_letterbox_like_the_engine(tmp_path):
    from fashionchameleon import media

    write_world_dataset(tmp_path, layout="folder", clips=1, frames=5)
    config = tiny_data(tmp_path, layout="folder")
    (triplet,) = discover_triplets(config)
    pixels = load_pixels(triplet, config, TINY_STREAM, load_video=False)
    expected = media.image_to_tensor(media.letterbox_garment(media.load_image(triplet.garment), 32, 64))
    assert torch.equal(pixels["garment"], expected) and "video" not in pixels


# -- the stages end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One world clip (so every batch is the same batch) and the tiny preset's own transformer as a weights folder."""
    root = tmp_path_factory.mktemp("training")
    write_world_dataset(root / "data", layout="folder", clips=1, frames=13)
    load_preset("tiny", device="cpu")[1].transformer.save_pretrained(root / "base")
    return root


def tiny(stage: str, workdir: Path, name: str, **values):
    """A tiny CPU config of `stage` writing to workdir/name; `values` override it (nested dicts merge)."""
    base = {
        "preset": "tiny", "stream": STREAM,  # 13 frames = 4 latent frames = 2 chunks
        "output_dir": str(workdir / name), "max_steps": 40, "log_every": 1, "checkpoint_every": 1000,
        "export_pipeline": True,
        "data": {"root": str(workdir / "data"), "layout": "folder", "num_frames": 13, "num_workers": 0,
                 "mixed_captions": False, "empty_prompt_prob": 0.0},
        "model": {"gradient_checkpointing": True},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "decay_steps": []},
    }
    for key, value in values.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(stage, base)


def fixed_losses(trainer: Trainer, batch) -> dict[str, float]:
    """Every trained network's loss on `batch` with fixed noise, timesteps and exit steps (4 draws, no grad)."""
    out = {}
    for network in trainer.stage.trained:
        values = []
        for seed in range(4):
            rng = Rngs(torch.Generator().manual_seed(100 + seed), torch.Generator().manual_seed(200 + seed))
            with torch.no_grad():
                values.append(float(trainer.loss(network, batch, rng)[0]))
        out[network] = sum(values) / len(values)
    return out


def overfit(config) -> tuple[dict[str, float], dict[str, float], Path]:
    trainer = Trainer(config)
    batch = trainer.next_batch()  # the dataset holds one clip: every batch is this batch
    before = fixed_losses(trainer, batch)
    exported = trainer.train()
    return before, fixed_losses(trainer, batch), exported


@pytest.fixture(scope="module")
def teacher(workdir):
    return overfit(tiny("teacher", workdir, "teacher", batch_size=4))


@pytest.fixture(scope="module")
def forcing(workdir, teacher):
    return overfit(tiny("forcing", workdir, "forcing", batch_size=4, model={"init": str(teacher[2])}))


def dmd_config(workdir, name, forcing_export, teacher_export, **values):
    """Generator from the tiny teacher-forcing run; real score and critic from the tiny teacher run."""
    defaults = {"generator_every": 2, "ema_start_step": 1, "reward": {"kind": "tiny"},
                "model": {"init": str(forcing_export), "teacher": str(teacher_export)},
                "optim": {"lr": 1e-3}, "critic_optim": {"lr": 1e-3}}
    return tiny("dmd", workdir, name, **{**defaults, **values})


def test_teacher_overfits_one_batch(teacher):
    before, after, exported = teacher
    assert after["generator"] < 0.8 * before["generator"]
    assert (exported / "config.json").is_file()


def test_teacher_forcing_overfits_one_batch_from_the_teacher(forcing):
    before, after, _ = forcing
    assert after["generator"] < 0.95 * before["generator"]  # the teacher's init already fits this clip


def test_gr_dmd_generator_lowers_its_dmd_loss_on_one_batch(workdir, teacher, forcing):
    config = dmd_config(workdir, "dmd_generator", forcing[2], teacher[2], max_steps=8, generator_every=1)
    before, after, _ = overfit(config)
    assert after["generator"] < 0.8 * before["generator"]


def test_gr_dmd_critic_learns_the_generators_samples(workdir, forcing):
    """The fake score starts untrained and follows a frozen generator: its flow-matching loss falls."""
    config = dmd_config(workdir, "dmd_critic", forcing[2], workdir / "base", max_steps=8, generator_every=1000,
                        optim={"lr": 0.0}, critic_optim={"lr": 3e-3})
    before, after, _ = overfit(config)
    assert after["critic"] < 0.93 * before["critic"]


def read_log(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(handle)]


def weights(trainer: Trainer, network: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.networks[network].state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def dmd_runs(workdir, teacher, forcing):
    """GR-DMD for 4 steps straight, and the same run killed during step 4 and resumed from its step-2 checkpoint."""
    config = dmd_config(workdir, "straight", forcing[2], teacher[2], max_steps=4, checkpoint_every=2)
    straight = Trainer(config)
    straight.train()

    killed_config = dmd_config(workdir, "killed", forcing[2], teacher[2], max_steps=4, checkpoint_every=2)
    killed = Trainer(killed_config)
    update = killed.update

    def update_until_killed(network):
        if killed.step == 3:
            raise KeyboardInterrupt  # kill -9 would leave the same files: checkpoint 2, log rows 1-3
        return update(network)

    killed.update = update_until_killed
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    shutil.copytree(workdir / "killed", workdir / "reseeded")
    resumed = Trainer(killed_config)
    start = resumed.step
    resumed.train()
    return straight, resumed, start


def test_a_spent_time_budget_stops_the_stage_saves_and_exports(workdir):
    """`max_seconds` bounds a stage by wall time (configs/mini-h200.yaml's 8-minute GPU run): the loop checks it
    before each step, so a budget spent at once stops at step 0, and the run still saves and exports."""
    stopped = Trainer(tiny("teacher", workdir, "budget", max_steps=3, max_seconds=1e-9))
    stopped.train()
    assert stopped.step == 0 and (workdir / "budget" / "transformer" / "config.json").is_file()
    unbounded = Trainer(tiny("teacher", workdir, "no-budget", max_steps=3))  # negative control: 0 = no limit
    unbounded.train()
    assert unbounded.step == 3


def test_a_recipe_variant_holds_only_what_differs_from_its_base():
    """configs/mini-2x2.yaml names mini.yaml as its base: every stage is mini.yaml's but for its folders and the
    architecture, which reaches the codec stage too."""
    raw, variant = load_recipe(CONFIGS / "mini-2x2.yaml")
    base_raw, base = load_recipe(CONFIGS / "mini.yaml")
    architecture = raw["shared"]["model"]["architecture"]
    assert architecture["codec"]["factor"] == 2 and base_raw["shared"]["model"].get("architecture") is None
    for mine, theirs in zip(variant, base):
        paths = {key: getattr(mine.model, key) for key in ("init", "teacher", "codec")}
        assert replace(mine, output_dir=theirs.output_dir, model=replace(mine.model, architecture={}, **{
            key: getattr(theirs.model, key) for key in paths})) == theirs
        assert all(path is None or path.startswith(raw["output_dir"]) for path in paths.values())
    codec = codec_config(raw)
    assert codec.architecture == architecture and codec.max_steps != codec_config(base_raw).max_steps


def test_a_bad_architecture_or_a_circular_base_is_a_clear_error(tmp_path):
    for architecture, message in (({"codec": {"factr": 2}}, "architecture.codec.factr is not a setting"),
                                  ({"vae": {"factor": 2}}, "architecture overrides transformer, codec")):
        with pytest.raises(UserInputError, match=message):
            config_from_dict("teacher", {"preset": "mini", "model": {"architecture": architecture}})
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(UserInputError, match="is its own base"):
        load_recipe(loop)
    (tmp_path / "list.yaml").write_text("- 1\n")
    (tmp_path / "variant.yaml").write_text("base: list.yaml\n")
    with pytest.raises(UserInputError, match="holds no recipe keys"):
        load_recipe(tmp_path / "variant.yaml")


def test_the_h200_recipe_fits_its_eight_minutes():
    """configs/mini-h200.yaml: every stage bounded by wall time, 7 minutes in all at most (start-up and exports take
    the rest of the device run's 8), the exports where the device run collects them."""
    raw, configs = load_recipe(CONFIGS / "mini-h200.yaml")
    assert all(c.max_seconds > 0 for c in configs) and sum(c.max_seconds for c in configs) <= 7 * 60
    assert raw["export"].startswith("out_h200/") and raw["teacher_export"].startswith("out_h200/")
    assert [c.reward.kind for c in configs if c.stage == "dmd"] == ["world"]


def test_kill_and_resume_continues_bit_exactly(workdir, dmd_runs, teacher, forcing):
    straight, resumed, start = dmd_runs
    assert start == 2 and resumed.step == straight.step == 4
    for network in ("generator", "critic", "real_score"):
        assert_same(weights(resumed, network), weights(straight, network))
    assert_same(resumed.ema.shadow, straight.ema.shadow)
    assert read_log(workdir / "killed" / "loss.csv") == read_log(workdir / "straight" / "loss.csv")
    assert [row["step"] for row in read_log(workdir / "killed" / "loss.csv")] == ["1", "2", "3", "4"]
    # Negative control: the same resume with this process's noise generator re-seeded is another run.
    reseeded = Trainer(dmd_config(workdir, "reseeded", forcing[2], teacher[2], max_steps=4, checkpoint_every=2))
    reseeded.rng.local.manual_seed(12345)
    reseeded.train()
    differences = [(a - b).abs().max() for a, b in zip(weights(reseeded, "generator").values(),
                                                       weights(straight, "generator").values())]
    assert max(differences) > 1e-6


def test_gr_dmd_rollout_never_evicts(dmd_runs):
    """The training rollout keeps the whole clip in its cache (docs/method.md §3.3): a window of the conditioning
    frames, the first chunk as sink and every later chunk as history."""
    straight, _, _ = dmd_runs
    loss, batch = straight.loss, straight.next_batch()
    video, _ = loss.rollout(batch, Rngs(torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)))
    assert loss.rollout_stream.window.window == batch.condition.shape[2] + video.shape[2]
    assert loss.rollout_stream.sink_frames == TINY_STREAM.chunk_frames


def test_stage3_student_loads_into_the_engine_and_streams(workdir, dmd_runs, forcing):
    straight, _, _ = dmd_runs
    # The exported transformer is the generator's EMA, not the initial (stage-2) weights.
    exported = CausalWanTransformer3DModel.from_pretrained(workdir / "straight" / "transformer")
    assert_same(exported.state_dict(), straight.ema.shadow)
    initial = CausalWanTransformer3DModel.from_pretrained(forcing[2])
    assert any(not torch.equal(a, b) for a, b in zip(exported.state_dict().values(), initial.state_dict().values()))

    preset, pipe = load_preset("tiny", checkpoint=workdir / "straight" / "pipeline", device="cpu")
    assert_same(pipe.transformer.state_dict(), straight.ema.shadow)
    assert pipe.stream == TINY_STREAM  # the export streams at the size it was trained at, not the preset's
    stream = StreamingEngine(pipe).start(REFERENCE, GARMENTS[1], "a person walks", seed=0, chunks=2)
    chunks = list(stream)
    assert [len(chunk.frames) for chunk in chunks] == [5, 8]  # chunks of 2 latent frames
    assert chunks[0].frames.shape[1:] == (TINY_STREAM.height, TINY_STREAM.width, 3)


def test_latent_cache_run_reads_the_same_batches(workdir):
    plain = Trainer(tiny("teacher", workdir, "plain_batches"))
    building = Trainer(tiny("teacher", workdir, "cached_batches", data={"latent_cache": str(workdir / "cache")},
                            export_pipeline=False))
    cached = Trainer(tiny("teacher", workdir, "cached_batches", data={"latent_cache": str(workdir / "cache")},
                          export_pipeline=False))
    assert building.prompt_encoder is not None and cached.prompt_encoder is None  # built once, then UMT5 stays off
    for _ in range(2):
        a, b = plain.next_batch(), cached.next_batch()
        assert torch.equal(a.condition, b.condition) and torch.equal(a.video, b.video) and torch.equal(a.text, b.text)
