"""DDP: two gloo processes with the same global batch train exactly what one process trains, and resume."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastddpm import Schedule, UNet
from fastddpm.unet import UNetConfig

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"),
    pytest.mark.filterwarnings("ignore:fastddpm. using the slow reference backend"),
]

CONFIG = UNetConfig(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
)
KW = dict(batch_size=6, lr=1e-3, warmup=2, ema_decay=0.9, seed=11, progress=False, log_every=2)
FIRST, TOTAL = 3, 5


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(21)
    return torch.rand(9, 1, 8, 8, generator=g) * 2 - 1  # 9 examples, global batch 6: batches span epochs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, result_dir: str) -> None:
    import warnings

    from fastddpm.training import train

    warnings.filterwarnings("ignore", message="fastddpm: using the slow reference backend")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        torch.manual_seed(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
        first = train(UNet(CONFIG), Schedule(), _data(), steps=FIRST, out_dir=out_dir, save_every=2, **KW)
        second = train(UNet(CONFIG), None, _data(), steps=TOTAL, out_dir=out_dir, resume=True, **KW)
        torch.save(
            {
                "raw": second.raw_model.state_dict(),
                "ema": second.model.state_dict(),
                "losses": first.losses + second.losses,
                "checkpoints": (first.checkpoints, second.checkpoints),
            },
            os.path.join(result_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process_and_resume(tmp_path):
    from fastddpm.training import train

    out_dir, result_dir = tmp_path / "ddp", tmp_path / "results"
    result_dir.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out_dir), str(result_dir)), nprocs=2, join=True)

    torch.manual_seed(100)  # rank 0's initial weights
    ref = train(UNet(CONFIG), Schedule(), _data(), steps=TOTAL, **KW)

    ranks = [torch.load(result_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for got in ranks:
        assert got["checkpoints"] == ([2, 3], [5])
        assert got["losses"] == pytest.approx(ref.losses, rel=1e-5, abs=1e-6)
        for name, module in (("raw", ref.raw_model), ("ema", ref.model)):
            want = module.state_dict()
            assert got[name].keys() == want.keys()
            # DDP averages gradients in another order than one process sums them: float noise. Adam divides
            # by the gradient's own scale, so where a gradient is ~0 (to_k.bias: softmax ignores a shift of
            # the keys; any weight whose gradient nearly cancels) the noise can flip an update's sign and move
            # that weight by up to 2*lr per step. Bound: nearly every weight within float noise, none beyond
            # 2*lr*steps.
            n_loose = n_all = 0
            for k in want:
                diff = (got[name][k] - want[k]).abs()
                assert float(diff.max()) <= 2 * KW["lr"] * TOTAL, k
                if not k.endswith("to_k.bias"):
                    n_loose += int((diff > 1e-5 + 1e-4 * want[k].abs()).sum())
                    n_all += want[k].numel()
            assert n_loose <= max(8, n_all // 1000), f"{name}: {n_loose} of {n_all} weights beyond float noise"
    # The checkpoint written by rank 0 holds the final EMA weights.
    saved = UNet.from_pretrained(out_dir).state_dict()
    for k, v in ranks[0]["ema"].items():
        assert torch.equal(saved[k], v)
    state = torch.load(out_dir / "training_state.pt", weights_only=True)
    assert state["step"] == TOTAL and state["hparams"]["world_size"] == 2
