"""AdamW and the warm-up/linear-decay schedule, without ``torch.optim``'s Optimizer.

``torch.optim.Optimizer`` imports ``torch._dynamo`` the first time it adds a parameter group, steps
or zeroes its gradients (it wraps them to keep ``torch.compile`` out): about 1 s and 69 MB of every
stage-two process, none of which compiles anything. ``FusedAdamW`` is the update
``torch.optim.AdamW(fused=True)`` makes, through the same kernel (``torch._fused_adamw_``) with the
same arguments and the same lazily created state, so every number is bit-identical; a test checks
it against torch's. Its ``state_dict`` has torch's layout, and ``LinearWarmupDecay``'s that of
``LambdaLR``, so resume points written before this load unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

__all__ = ["FusedAdamW", "LinearWarmupDecay"]


class FusedAdamW:
    """AdamW (decoupled weight decay, no amsgrad) over one parameter group."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        self.param_groups: list[dict[str, Any]] = [{
            "params": self.params, "lr": float(lr), "betas": tuple(betas), "eps": float(eps),
            "weight_decay": float(weight_decay), "amsgrad": False, "maximize": False, "foreach": None,
            "capturable": False, "differentiable": False, "fused": True, "decoupled_weight_decay": True}]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        by_device: dict[tuple, list[list[torch.Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:  # as torch's Adam._init_group with fused=True
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            lists = by_device.setdefault((p.device, p.dtype), [[], [], [], [], []])
            for lst, t in zip(lists, (p, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"])):
                lst.append(t)
        beta1, beta2 = group["betas"]
        for params, grads, exp_avgs, exp_avg_sqs, steps in by_device.values():
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
                                beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                maximize=False, grad_scale=None, found_inf=None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().requires_grad_(False).zero_()

    def state_dict(self) -> dict:
        index = {id(p): i for i, p in enumerate(self.params)}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(self.params)))}
                  for g in self.param_groups]
        return {"state": {index[id(p)]: dict(st) for p, st in self.state.items() if st}, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        (group,) = sd["param_groups"]
        if len(group["params"]) != len(self.params):
            raise ValueError(f"the saved optimizer has {len(group['params'])} parameters, this model "
                             f"{len(self.params)}")
        self.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
        self.param_groups[0]["betas"] = tuple(self.param_groups[0]["betas"])
        self.state = defaultdict(dict)
        for i, st in sd["state"].items():
            p = self.params[int(i)]
            # copies (as torch's load_state_dict): the caller's tensors must not be updated in place
            self.state[p] = {k: v.to(device=p.device, dtype=torch.float32 if k == "step" else p.dtype, copy=True)
                             if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float32, device=p.device)
                             for k, v in st.items()}


class LinearWarmupDecay:
    """``LambdaLR(optimizer, f)`` for one group: the lr is ``base_lr * f(steps taken)``."""

    def __init__(self, optimizer: FusedAdamW, f: Callable[[int], float]) -> None:
        self.optimizer = optimizer
        self.f = f
        group = optimizer.param_groups[0]
        group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"]]
        self.last_epoch = -1
        self.step()

    def step(self) -> None:
        self.last_epoch += 1
        self.optimizer.param_groups[0]["lr"] = self.base_lrs[0] * self.f(self.last_epoch)

    def get_last_lr(self) -> list[float]:
        return [self.optimizer.param_groups[0]["lr"]]

    def state_dict(self) -> dict:
        lr = self.get_last_lr()
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch, "_step_count": self.last_epoch + 1,
                "_get_lr_called_within_step": False, "_last_lr": lr, "lr_lambdas": [None]}

    def load_state_dict(self, sd: dict) -> None:
        self.base_lrs = list(sd["base_lrs"])
        self.last_epoch = int(sd["last_epoch"])  # the lr itself comes back with the optimizer's groups
