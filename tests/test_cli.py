"""The CLI as a person uses it: real processes, real files, exit codes."""

import subprocess
import sys

import pytest
import torch
from helpers import GARMENTS, REFERENCE, ROOT, TINY_TRANSFORMER, cli_refusals, probe_video, to_official_state_dict

from fashionchameleon.pipeline import FashionChameleonPipeline
from fashionchameleon.presets import load_preset

G1, G2, G3 = GARMENTS[:3]


def build_tiny():
    return load_preset("tiny", device="cpu")[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fashionchameleon", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_generate_writes_h264_with_33_frames(tmp_path):
    out = tmp_path / "out.mp4"
    result = cli("generate", "--preset", "tiny", "--reference", REFERENCE, "--garment", G1, "--chunks", "3",
                 "--output", str(out))
    assert result.returncode == 0, result.stderr
    info = probe_video(out)
    assert (info.codec, info.frames, info.width, info.height) == ("h264", 33, 64, 96)


def test_generate_with_two_switches_writes_69_frames(tmp_path):
    out = tmp_path / "switch.mp4"
    result = cli("generate", "--preset", "tiny", "--reference", REFERENCE, "--garment", G1, "--chunks", "6",
                 "--switch", f"2:{G2}", "--switch", f"4:{G3}", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert probe_video(out).frames == 69


def changed(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with flag set to value: replaced where it is, added where it is not."""
    if flag in argv:
        at = argv.index(flag) + 1
        return [*argv[:at], value, *argv[at + 1:]]
    return [*argv, flag, value]


GENERATE = ["generate", "--preset", "tiny", "--reference", REFERENCE, "--garment", G1, "--output", "{folder}/o.mp4"]
TRAIN_DMD = ["train", "dmd", "--config", "configs/tiny.yaml", "--set"]
#: Command lines the CLI refuses, each with what its one line must say. {folder} is a fresh folder holding a model.pt
#: that is not a checkpoint.
REFUSALS = {
    "missing reference": (changed(GENERATE, "--reference", "missing.png"), "missing.png"),
    "reference not an image": (changed(GENERATE, "--reference", __file__), "image"),
    "unknown preset": (changed(GENERATE, "--preset", "nope"), "unknown preset"),
    "checkpoint not a folder": (changed(GENERATE, "--checkpoint", __file__), "model_index.json"),
    "switch at chunk 0": (changed(GENERATE, "--switch", "0:x.png"), "K >= 1"),
    "train all with --set": (["train", "all", "--config", "configs/tiny.yaml", "--set", "max_steps=1"],
                             "--set applies to one stage"),
    "--set without a value": ([*TRAIN_DMD, "max_steps"], "KEY=VALUE"),
    "--set of an unknown key": ([*TRAIN_DMD, "reward.knd=world"], "unknown config key reward.knd"),
    "convert a non-checkpoint": (["convert", "--input", "{folder}/model.pt", "--output", "{folder}/out", "--preset",
                                  "tiny"], "as a PyTorch checkpoint"),
    "eval an unknown mode": (["eval", "--modes", "refresh,teleport"], "teleport"),
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """(exit code, stderr) of every REFUSALS case, run in one batch."""
    folder = tmp_path_factory.mktemp("refusals")
    (folder / "model.pt").write_text("not a checkpoint")
    argvs = [[arg.format(folder=folder) for arg in argv] for argv, _ in REFUSALS.values()]
    return dict(zip(REFUSALS, cli_refusals(*argvs)))


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_input_is_one_line_and_exit_code_2(refusals, case):
    returncode, stderr = refusals[case]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2 and len(lines) == 1 and REFUSALS[case][1] in lines[0], stderr


def test_convert_official_checkpoint_then_load_matches(tmp_path):
    """model.pt (both official layouts) -> convert -> from_pretrained gives the directly built model's output."""
    pipe = build_tiny()
    model = pipe.transformer
    official = to_official_state_dict(model.state_dict())
    noisy = {k: v + 0.1 for k, v in official.items()}
    x = torch.randn(1, 48, 3, 6, 4, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x, torch.tensor([500.0]), text).sample
    for name, payload in [("plain", {"generator": official, "global_step": 3}),
                          ("dmd", {"generator": noisy, "critic": noisy, "generator_ema": official})]:
        path = tmp_path / f"{name}.pt"
        torch.save(payload, path)
        out = tmp_path / f"{name}-converted"
        result = cli("convert", "--input", str(path), "--output", str(out), "--preset", "tiny")
        assert result.returncode == 0, result.stderr
        loaded = type(model).from_pretrained(out).eval()
        with torch.no_grad():
            assert float((loaded(x, torch.tensor([500.0]), text).sample - expected).abs().max()) == 0.0
    # Negative control: the noisy generator weights give another output.
    model_noisy = type(model).from_config(model.config)
    from fashionchameleon.models.convert import convert_official_state_dict

    model_noisy.load_state_dict(convert_official_state_dict({k[len("model."):]: v for k, v in noisy.items()}))
    with torch.no_grad():
        assert float((model_noisy.eval()(x, torch.tensor([500.0]), text).sample - expected).abs().max()) > 1e-2


def test_whole_preset_save_pretrained_round_trip(tmp_path):
    """save_pretrained -> from_pretrained of the whole pipeline (tokenizer, UMT5, transformer, VAE, scheduler)
    streams the same video, and the CLI loads the folder as --checkpoint."""
    pipe = build_tiny()
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = FashionChameleonPipeline.from_pretrained(tmp_path / "tiny")
    videos = [p(REFERENCE, G1, "a person walks", num_chunks=2, seed=2).frames for p in (pipe, loaded)]
    assert (videos[0] == videos[1]).all() and len(videos[0]) == 9 + 12
    out = tmp_path / "o.mp4"
    result = cli("generate", "--preset", "tiny", "--checkpoint", str(tmp_path / "tiny"), "--reference", REFERENCE,
                 "--garment", G1, "--chunks", "1", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert probe_video(out).frames == 9


def test_wan22_preset_loads_a_stock_wan_folder_plus_official_checkpoint(tmp_path):
    """The 5B loading path on tiny sizes: a stock diffusers WanPipeline folder (what the hub holds) as the base,
    FashionChameleon weights from an official model.pt on top."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tiny = build_tiny()
    stock = WanTransformer3DModel(**TINY_TRANSFORMER)
    base = WanPipeline(tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder, vae=tiny.vae,
                       scheduler=UniPCMultistepScheduler(flow_shift=5.0), transformer=stock, expand_timesteps=True)
    base.save_pretrained(tmp_path / "base")
    torch.save({"generator_ema": to_official_state_dict(tiny.transformer.state_dict())}, tmp_path / "model.pt")
    _, pipe = load_preset("wan22-ti2v-5b", checkpoint=tmp_path / "model.pt", base=tmp_path / "base", device="cpu")
    assert type(pipe.transformer).__name__ == "CausalWanTransformer3DModel"
    for name, value in tiny.transformer.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[name], value), name
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
