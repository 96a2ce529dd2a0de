"""Data parallelism: 2 CPU processes (gloo) end with the weights of 1 process on the same global batches."""

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from drmm import train as T
from drmm.config import config_from_dict
from drmm_cases import DATA_DIR, needs_mnist

pytestmark = needs_mnist

RUNS = {  # semi-supervised EG (DDP gradients + synchronised BN) and hard EM (all-reduced normal equations)
    "eg": dict(trainer="eg", mode="semisupervised", num_labeled=20, model="drmm2"),
    # NRM options: the BiasAdder rides on the synchronised BN; the Max-Min min branch has its own synchronised BNs
    "eg_maxmin": dict(trainer="eg", mode="semisupervised", num_labeled=20, model="drmm2", bias_adder=True, maxmin=True),
    # one M-step over all 4 batches: a second E-step would start from weights that differ by float rounding, and
    # hard switches can flip on such differences (hard EM is not continuous in its inputs)
    "hard_em": dict(trainer="hard_em", mode="supervised", num_labeled=0, model="drmm2", em_window=4, em_ridge=1e-3),
}


def tiny(kind):
    base = dict(
        name="dp",
        dataset="mnist",
        data_dir=DATA_DIR,
        download=False,
        max_train_samples=200,
        eval_samples=100,
        batch_size=20,
        epochs=1,
        max_steps=4,
        progress=False,
        tensorboard=False,
        lr_init=2e-3,
        lr_final=1e-4,
        switch_prior_momentum=0.5,
    )
    return config_from_dict({**base, **RUNS[kind]})


def _rank_main(rank, world, port, out):
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    # one process group for both runs (train() joins one only when none exists, and leaves it to its creator)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for kind in RUNS:
            T.train(tiny(kind), Path(out) / kind)
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    for kind in RUNS:
        T.train(tiny(kind), tmp_path / "one" / kind)
        one = torch.load(tmp_path / "one" / kind / "last.pt", weights_only=True)
        two = torch.load(tmp_path / "two" / kind / "last.pt", weights_only=True)
        assert one["step"] == two["step"] == 4
        # float32 sums in another order: EG agrees to ~1e-5; the M-step's ridge solve (condition number up to
        # 1/em_ridge) amplifies that. A rank that solved its own half of the data alone would be off by O(1).
        tol = 2e-3 if kind == "hard_em" else 2e-4
        for k, v in one["model"].items():
            if v.is_floating_point():
                if k.startswith("switch_prior") and kind != "hard_em":
                    # switch frequencies are counts: float rounding that flips one near-tied switch moves an
                    # entry by momentum/batch = 0.025, so they get a count-sized tolerance
                    assert (two["model"][k] - v).abs().max() <= 0.03, (kind, k)
                    assert (two["model"][k] - v).abs().mean() <= 1e-3, (kind, k)
                    continue
                diff = (two["model"][k].double() - v.double()).norm()
                assert diff <= tol * v.double().norm() + 1e-7, (kind, k, float(diff), float(v.double().norm()))
        # the parameters did move: the comparison is not of two untouched initialisations
        fresh = T.model_from_config(tiny(kind), (1, 28, 28), 10).state_dict()
        assert not torch.allclose(fresh["convs.0.conv.weight"], one["model"]["convs.0.conv.weight"])
        # rank 0 alone wrote the run dir; metrics exist once
        assert (tmp_path / "two" / kind / "metrics.csv").read_text().count("\n") >= 2
