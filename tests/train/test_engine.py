"""`start_engine`: on one fp32 rank it skips DeepSpeed's all-reduce over that one rank and clips with torch's
`clip_grad_norm_`; the parameters it trains must equal DeepSpeed's own path, clipping and accumulation
included. A real DeepSpeed engine on a real one-process gloo group."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipelines.train.config import PretrainConfig
from pipelines.train.pretrain import deepspeed_config, lr_lambda, start_engine


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory):
    """One process group for the module: DeepSpeed caches its groups, which must stay those of a live group."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():  # as Ray Train sets them
            env.setenv(name, value)
        # where the training workers keep DeepSpeed's JIT-built ops (pipelines.runtime.init_ray)
        env.setenv("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
        store = tmp_path_factory.mktemp("gloo") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def train(config: PretrainConfig, lean: bool, steps: int) -> tuple[list[torch.Tensor], list[float], object]:
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(2, steps, 0.1))
    if lean:
        engine, update = start_engine(model, optimizer, schedule, config, bf16=False, world=1)
    else:  # DeepSpeed doing the all-reduce and the clipping itself
        ds_config = deepspeed_config(config, False, 1) | {"gradient_clipping": config.optim.grad_clip}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                               config=ds_config, dist_init_required=False)

        def update(loss: torch.Tensor) -> None:
            engine.backward(loss)
            engine.step()

    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps * config.engine.grad_accum):
        x, y = torch.randn(8, 16, generator=data) * 10, torch.randn(8, 4, generator=data) * 10  # big grads: clipped
        loss = torch.nn.functional.mse_loss(engine(x), y)
        update(loss)
        losses.append(loss.item())
    return [p.detach().clone() for p in engine.module.parameters()], losses, engine


@pytest.mark.usefixtures("one_rank")
@pytest.mark.parametrize("grad_accum", [1, 3])
def test_single_rank_path_trains_the_same_parameters_as_deepspeed(grad_accum: int) -> None:
    config = PretrainConfig.model_validate({"engine": {"workers": 1, "micro_batch": 8, "grad_accum": grad_accum},
                                            "optim": {"grad_clip": 0.5}})
    ours, our_losses, engine = train(config, lean=True, steps=6)
    theirs, their_losses, _ = train(config, lean=False, steps=6)

    assert engine.enable_backward_allreduce is False and engine.gradient_clipping() == 0.0  # we clip, not it
    torch.testing.assert_close(our_losses, their_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    unclipped, _, _ = train(config.model_copy(update={"optim": config.optim.model_copy(update={"grad_clip": 0.0})}),
                            lean=True, steps=6)
    assert any(not torch.allclose(a, b) for a, b in zip(ours, unclipped, strict=True))  # clipping did happen


def test_two_ranks_or_bf16_leave_clipping_to_deepspeed() -> None:
    config = PretrainConfig.model_validate({"optim": {"grad_clip": 0.7}})
    assert deepspeed_config(config, bf16=False, world=2)["gradient_clipping"] == 0.7
    assert deepspeed_config(config, bf16=True, world=1)["gradient_clipping"] == 0.7
    assert deepspeed_config(config, bf16=False, world=1)["gradient_clipping"] == 0.0
