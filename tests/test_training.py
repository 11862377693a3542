"""Training loop, checkpoint/resume, targets, data loading and the ``fastddpm train`` command (CPU, tiny models)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from fastddpm import STREAM_QSAMPLE, Schedule, UNet, q_sample, randn
from fastddpm.data import DATASETS, digits_split, load_dataset, load_digits
from fastddpm.training import LOG_NAME, SCHEDULER_NAME, STATE_NAME, train, training_target
from fastddpm.unet import UNetConfig

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:fastddpm. using the slow reference backend")


def tiny_config(channels: int = 1, out_channels: int | None = None) -> UNetConfig:
    return UNetConfig(
        sample_size=8,
        in_channels=channels,
        out_channels=channels if out_channels is None else out_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def tiny_model(seed: int = 0, channels: int = 1) -> UNet:
    torch.manual_seed(seed)
    return UNet(tiny_config(channels))


def random_images(n: int, c: int = 1, size: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, **tol) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


# ----------------------------------------------------------------------------- learning
def test_training_lowers_the_loss_on_digits():
    result = train(tiny_model(), Schedule(), "digits", steps=40, batch_size=32, lr=2e-3, warmup=5, progress=False,
                   log_every=7)  # fmt: skip
    assert len(result.losses) == 40 and result.step == 40 and result.start_step == 0
    assert all(math.isfinite(v) for v in result.losses)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-10:])
    assert last < 0.6 * first, (first, last)
    assert not result.model.training and result.model is not result.raw_model
    assert all(not p.requires_grad for p in result.model.parameters())


def test_ema_follows_the_decay_rule():
    """After one step the EMA is ``d * init + (1 - d) * trained`` with ``d = min(ema_decay, 1 / 10)``."""
    model = tiny_model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    data = random_images(16)
    ema_decay = 0.15
    r1 = train(model, Schedule(), data, steps=1, batch_size=4, ema_decay=ema_decay, progress=False)
    d1 = min(ema_decay, 1 / 10)
    w1 = {k: v.clone() for k, v in r1.raw_model.state_dict().items()}
    for k, v in r1.model.state_dict().items():
        torch.testing.assert_close(v, d1 * init[k] + (1 - d1) * w1[k])


# ----------------------------------------------------------------------------- targets
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_q_sample_noise_is_reproduced_by_randn(backend):
    schedule = Schedule()
    x0 = torch.rand(5, 3, 7, 9) * 2 - 1
    t = torch.randint(0, 1000, (5,))
    seed, k = int(torch.randint(0, 2**40, ())), int(torch.randint(0, 10**6, ()))
    x_t = q_sample(x0, t, schedule, seed=seed, sample_offset=k, backend=backend)
    eps = randn(x0.shape, seed=seed, sample_offset=k, t=t, stream=STREAM_QSAMPLE, backend=backend)
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    want = abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps.double()
    torch.testing.assert_close(x_t.double(), want, rtol=1e-5, atol=1e-5)
    other = randn(x0.shape, seed=seed, sample_offset=k + 1, t=t, stream=STREAM_QSAMPLE, backend=backend)
    assert not torch.allclose(other, eps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_training_target_formula(prediction_type):
    schedule = Schedule(prediction_type=prediction_type)
    x0, eps = torch.randn(6, 2, 5, 3), torch.randn(6, 2, 5, 3)
    t = torch.randint(0, 1000, (6,))
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    want = {
        "epsilon": eps.double(),
        "sample": x0.double(),
        "v_prediction": abar.sqrt() * eps.double() - (1 - abar).sqrt() * x0.double(),
    }[prediction_type]
    torch.testing.assert_close(training_target(x0, eps, t, schedule).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loop_feeds_q_sample_and_regresses_the_right_target(prediction_type):
    """Hook the model: its input must be q_sample of x0 with the noise keyed by the global example counter,
    and the recorded loss must be the MSE to the prediction-type target computed here in float64."""
    schedule = Schedule(prediction_type=prediction_type)
    x0_one = random_images(1, seed=3)
    data = x0_one.expand(10, -1, -1, -1).clone()  # identical examples: the data order does not matter
    model = tiny_model()
    seen = []
    model.register_forward_hook(lambda mod, args, out: seen.append((args[0].detach().clone(), args[1].clone(),
                                                                    out.detach().clone())))  # fmt: skip
    batch, seed = 4, 1234
    result = train(model, schedule, data, steps=3, batch_size=batch, seed=seed, progress=False)
    assert len(seen) == 3
    for step, (x_t, t, out) in enumerate(seen):
        assert t.dtype == torch.int64 and t.shape == (batch,) and 0 <= int(t.min()) and int(t.max()) < 1000
        eps = randn((batch, 1, 8, 8), seed=seed, sample_offset=step * batch, t=t, stream=STREAM_QSAMPLE).double()
        abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = x0_one.double().expand(batch, -1, -1, -1)
        torch.testing.assert_close(x_t.double(), abar.sqrt() * x0 + (1 - abar).sqrt() * eps, rtol=1e-5, atol=1e-5)
        target = {"epsilon": eps, "sample": x0, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0}
        want_loss = float(((out.double() - target[prediction_type]) ** 2).mean())
        assert result.losses[step] == pytest.approx(want_loss, rel=1e-5)


def test_flip_is_off_by_default_and_flips_when_asked():
    """An image and its mirror must both reach the model with flip=True, never the mirror without it."""
    x0_one = random_images(1, seed=5)
    data = x0_one.expand(8, -1, -1, -1).clone()
    schedule = Schedule(beta_end=1e-9, beta_start=1e-9)  # x_t ~= x0: the input shows which image came in
    for flip in (False, True):
        model = tiny_model()
        inputs = []
        model.register_forward_hook(lambda mod, args, out, inputs=inputs: inputs.append(args[0].detach().clone()))
        train(model, schedule, data, steps=2, batch_size=8, flip=flip, progress=False)
        x = torch.cat(inputs)
        mirrored = (x - x0_one.flip(-1)).abs().amax(dim=(1, 2, 3)) < 0.05
        plain = (x - x0_one).abs().amax(dim=(1, 2, 3)) < 0.05
        assert bool((mirrored | plain).all())
        assert bool(mirrored.any()) == flip and bool(plain.any())


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_and_resume_equals_uninterrupted(tmp_path):
    data = random_images(11, seed=7)  # 11 examples, batch 4: batches span epochs
    kw = dict(batch_size=4, lr=1e-3, warmup=3, ema_decay=0.9, seed=5, progress=False, log_every=2)
    whole = train(tiny_model(0), Schedule(), data, steps=7, out_dir=tmp_path / "whole", save_every=None, **kw)
    assert whole.checkpoints == [7]

    first = train(tiny_model(0), Schedule(), data, steps=4, out_dir=tmp_path / "split", save_every=3, **kw)
    assert first.checkpoints == [3, 4]
    # Resume with a differently initialised model: every weight must come from the saved state.
    second = train(tiny_model(99), None, data, steps=7, out_dir=tmp_path / "split", resume=True, **kw)
    assert second.start_step == 4 and second.step == 7 and second.checkpoints == [7]
    assert first.losses + second.losses == pytest.approx(whole.losses, rel=1e-6, abs=1e-7)
    assert_same_state(second.raw_model, whole.raw_model, rtol=1e-6, atol=1e-7)
    assert_same_state(second.model, whole.model, rtol=1e-6, atol=1e-7)

    # What is on disk: the EMA model, the schedule, the state, the log.
    loaded = UNet.from_pretrained(tmp_path / "split")
    assert_same_state(loaded, second.model, rtol=0, atol=0)
    sched = json.loads((tmp_path / "split" / SCHEDULER_NAME).read_text())
    assert Schedule.from_diffusers(sched) == Schedule()
    state = torch.load(tmp_path / "split" / STATE_NAME, weights_only=True)
    assert state["step"] == 7 and state["hparams"]["batch_size"] == 4
    log = [json.loads(line) for line in (tmp_path / "split" / LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 7] and all(math.isfinite(r["loss"]) for r in log)
    assert not list((tmp_path / "split").glob(".*tmp"))


def test_resume_by_preset_name_and_nothing_left_to_do(tmp_path):
    data = random_images(6)
    kw = dict(batch_size=2, progress=False, out_dir=tmp_path)
    train(tiny_model(), Schedule(), data, steps=2, **kw)
    # A name is ignored on resume: the architecture comes from the state.
    more = train("digits", None, data, steps=3, resume=True, **kw)
    assert more.raw_model.config == tiny_config() and more.step == 3 and len(more.losses) == 1
    with pytest.warns(UserWarning, match="nothing to do"):
        done = train("digits", None, data, steps=3, resume=True, **kw)
    assert done.losses == [] and done.checkpoints == []


def test_resume_and_overwrite_errors(tmp_path):
    data = random_images(6)
    with pytest.raises(FileNotFoundError, match=STATE_NAME):
        train(tiny_model(), None, data, steps=1, batch_size=2, progress=False, out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="out_dir"):
        train(tiny_model(), None, data, steps=1, batch_size=2, progress=False, resume=True)
    train(tiny_model(), None, data, steps=1, batch_size=2, progress=False, out_dir=tmp_path)
    with pytest.raises(FileExistsError, match="resume"):
        train(tiny_model(), None, data, steps=2, batch_size=2, progress=False, out_dir=tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny_model(), None, data, steps=2, batch_size=3, progress=False, out_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="schedule"):
        train(tiny_model(), Schedule(beta_end=0.03), data, steps=2, batch_size=2, progress=False, out_dir=tmp_path,
              resume=True)  # fmt: skip
    with pytest.raises(ValueError, match="examples"):
        train(tiny_model(), None, data[:5], steps=2, batch_size=2, progress=False, out_dir=tmp_path, resume=True)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(schedule=Schedule(variance_type="learned_range")), ValueError, "variational"),
        (dict(data=random_images(4, c=3)), ValueError, "channels"),
        (dict(data=random_images(4) * 3), ValueError, r"\[-1, 1\]"),
        (dict(data=random_images(4, size=7)), ValueError, "multiples"),
        (dict(steps=0), ValueError, "steps"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(ema_decay=1.0), ValueError, "ema_decay"),
        (dict(model="no-such-preset"), ValueError, "preset"),
        (dict(data="no-such-dataset"), ValueError, "digits"),
    ],
)
def test_argument_errors(kwargs, exc, match):
    args = dict(model=tiny_model(), schedule=None, data=random_images(4), steps=1, batch_size=2, progress=False)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        train(args.pop("model"), args.pop("schedule"), args.pop("data"), **args)


def test_nan_loss_is_reported():
    model = tiny_model()
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step 1"):
        train(model, None, random_images(4), steps=3, batch_size=2, progress=False, log_every=2)


# ----------------------------------------------------------------------------- data
def test_digits_dataset():
    from sklearn.datasets import load_digits as sk_load_digits

    x = load_dataset("digits")
    ref = torch.as_tensor(sk_load_digits().images, dtype=torch.float64)
    assert x.dtype == torch.float32 and x.shape == (1797, 1, 8, 8)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    torch.testing.assert_close(x.double(), (ref / 8 - 1).unsqueeze(1), rtol=0, atol=1e-7)
    big = load_dataset("digits", image_size=16, channels=3)
    assert big.shape == (1797, 3, 16, 16) and float(big.min()) >= -1 and float(big.max()) <= 1
    assert torch.equal(big[:, 0], big[:, 2])


def test_digits_split_is_deterministic_stratified_and_disjoint():
    images, labels = load_digits(with_labels=True)
    a, b = digits_split(), digits_split()
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert set(a.train.tolist()).isdisjoint(a.test.tolist())
    assert sorted(a.train.tolist() + a.test.tolist()) == list(range(1797))
    assert torch.equal(a.train_labels, labels[a.train]) and torch.equal(a.test_labels, labels[a.test])
    for c in range(10):
        n_c = int((labels == c).sum())
        assert int((a.test_labels == c).sum()) == round(n_c * 0.2)
    other = digits_split(seed=1)
    assert not torch.equal(other.test, a.test)
    assert torch.equal(load_dataset("digits-test"), images[a.test])
    assert load_dataset("digits-train").shape[0] == a.train.numel()


def _save(path, array, mode):
    Image.fromarray(array, mode=mode).save(path)


def test_image_folder_crop_resize_and_channels(tmp_path):
    rng = np.random.default_rng(0)
    # A 10x6 RGB image whose central 6x6 square is one colour: center-crop + resize must give that colour.
    wide = np.zeros((6, 10, 3), np.uint8)
    wide[:, :2], wide[:, 8:] = (255, 0, 0), (0, 0, 255)
    wide[:, 2:8] = (40, 120, 200)
    _save(tmp_path / "a_wide.png", wide, "RGB")
    gray = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub" / "b_gray.png", gray, "L")
    (tmp_path / "notes.txt").write_text("not an image")

    x = load_dataset(tmp_path, image_size=4)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 4)
    want = torch.tensor([40, 120, 200], dtype=torch.float32) / 127.5 - 1
    torch.testing.assert_close(x[0], want.view(3, 1, 1).expand(3, 4, 4), rtol=0, atol=1.5 / 127.5)
    g = torch.from_numpy(gray).float() / 127.5 - 1
    for c in range(3):  # a greyscale file in a colour set is replicated over RGB, at its own size: exact
        torch.testing.assert_close(x[1, c], g, rtol=0, atol=1e-6)

    only_gray = tmp_path / "sub"
    y = load_dataset(only_gray)
    assert y.shape == (1, 1, 4, 4)
    torch.testing.assert_close(y[0, 0], g, rtol=0, atol=1e-6)
    _save(tmp_path / "sub" / "c.JPG", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
    with pytest.raises(ValueError, match="different sizes"):
        load_dataset(only_gray)
    assert load_dataset(only_gray, image_size=2, channels=1).shape == (2, 1, 2, 2)


def test_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        load_dataset(tmp_path)
    _save(tmp_path / "ok.png", np.zeros((4, 4), np.uint8), "L")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset(tmp_path)
    with pytest.raises(ValueError) as info:
        load_dataset("cifar-100")
    assert all(name in str(info.value) for name in DATASETS)
    with pytest.raises(ValueError, match="file"):
        load_dataset(tmp_path / "ok.png")


def test_folder_dataset_trains(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(5):
        _save(tmp_path / f"img{i}.png", rng.integers(0, 256, (9, 12, 3), dtype=np.uint8), "RGB")
    result = train(tiny_model(channels=3), None, tmp_path, steps=2, batch_size=2, progress=False)
    assert result.step == 2 and len(result.losses) == 2


# ----------------------------------------------------------------------------- CLI
def _cli(argv):
    from fastddpm.cli_train import add_train_parser

    parser = argparse.ArgumentParser(prog="fastddpm")
    add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_train_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", "digits", "--model", "digits", "--steps", "2", "--batch-size", "2", "--out", str(out),
            "--no-progress", "--device", "cpu", "--save-every", "0"]  # fmt: skip
    assert _cli(argv) == 0
    text = capsys.readouterr().out
    assert str(out) in text and "2 steps" in text
    assert {"config.json", "model.safetensors", SCHEDULER_NAME, STATE_NAME} <= {p.name for p in out.iterdir()}
    assert UNet.from_pretrained(out).config == UNet.from_preset("digits").config

    assert _cli(argv) == 2  # the run exists and --resume was not given
    assert "resume" in capsys.readouterr().err
    assert _cli([*argv[:6], "3", *argv[7:], "--resume"]) == 0
    assert "steps 2..3" in capsys.readouterr().out


def test_seed_seeds_the_initial_weights_of_a_preset(tmp_path):
    """``train(<preset name>, seed=s)`` twice gives the same model; another seed another one; the
    caller's global generator is left as it was."""
    data = random_images(4)
    kw = dict(batch_size=2, steps=1, progress=False)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = train("digits", Schedule(), data, seed=3, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)  # a different global state must not matter
    b = train("digits", Schedule(), data, seed=3, **kw)
    c = train("digits", Schedule(), data, seed=4, **kw)
    assert_same_state(a.raw_model, b.raw_model, rtol=0, atol=0)
    diff = [k for k, v in a.raw_model.state_dict().items() if not torch.equal(v, c.raw_model.state_dict()[k])]
    assert diff  # another seed, other weights


def test_resumed_log_has_each_step_once(tmp_path):
    """A run killed after its last checkpoint logged steps the resumed run trains (and logs) again."""
    data = random_images(8)
    kw = dict(batch_size=2, progress=False, log_every=1, out_dir=tmp_path, seed=1)
    train(tiny_model(), Schedule(), data, steps=2, save_every=1, **kw)
    log = tmp_path / LOG_NAME
    # What a kill after the step-2 checkpoint but during steps 3-4 leaves: their records, a cut line.
    state = torch.load(tmp_path / STATE_NAME, weights_only=True)
    assert state["step"] == 2
    with log.open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + json.dumps({"step": 4, "loss": 1.0}) + "\n" + '{"ste')
    train(tiny_model(), None, data, steps=4, resume=True, **kw)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
