"""The trained agent at decision time, and the file it lives in.

A policy file (`policy.zip`) is a plain zip holding:

    rap_policy.json   model, KV ratios, removal order, quality model, mask ladder, workload, training log
    agent.npz         the actor network's weights (numpy), for the fast path
    sb3_model.zip     the full sb3-contrib MaskablePPO model (optimizer state too): resume training

Deciding never imports torch, gymnasium or stable-baselines3: `Agent` is the actor MLP
re-written in numpy (checked against sb3's own `predict` in tests), so a decision is one small
matrix-vector chain plus the fit table, well under a millisecond on a CPU.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rap.errors import RapError
from rap.core.memory import MemoryModel, Request
from rap.policy.evaluator import QualityModel
from rap.policy.ladder import MaskLadder, decode_split, observe, split_choices

FORMAT = 1


@dataclass
class Agent:
    """Actor MLP: hidden layers (W, b) with tanh/relu, then the action logits layer."""

    hidden: list[tuple[np.ndarray, np.ndarray]]
    head: tuple[np.ndarray, np.ndarray]
    activation: str = "tanh"

    def logits(self, obs: np.ndarray) -> np.ndarray:
        h = obs.astype(np.float32)
        act = np.tanh if self.activation == "tanh" else (lambda x: np.maximum(x, 0))
        for W, b in self.hidden:
            h = act(W @ h + b)
        W, b = self.head
        return W @ h + b

    def act(self, obs: np.ndarray, action_mask: np.ndarray) -> int:
        """Deterministic: the highest-logit action among those the mask allows."""
        return int(np.argmax(np.where(action_mask, self.logits(obs), -np.inf)))

    @classmethod
    def from_sb3(cls, model) -> "Agent":
        import torch

        policy = model.policy
        layers = [m for m in policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)]
        acts = {type(m).__name__ for m in policy.mlp_extractor.policy_net if not isinstance(m, torch.nn.Linear)}
        activation = "relu" if acts == {"ReLU"} else "tanh"
        if acts - {"Tanh", "ReLU"}:
            raise RapError(f"unsupported activation in the policy network: {acts}")
        grab = lambda m: (m.weight.detach().cpu().numpy().astype(np.float32),  # noqa: E731
                          m.bias.detach().cpu().numpy().astype(np.float32))
        return cls([grab(m) for m in layers], grab(policy.action_net), activation)

    def to_npz(self) -> bytes:
        arrays = {f"W{i}": W for i, (W, _) in enumerate(self.hidden)}
        arrays.update({f"b{i}": b for i, (_, b) in enumerate(self.hidden)})
        arrays.update({"Wout": self.head[0], "bout": self.head[1]})
        buf = io.BytesIO()
        np.savez(buf, activation=np.array(self.activation), **arrays)
        return buf.getvalue()

    @classmethod
    def from_npz(cls, data: bytes) -> "Agent":
        z = np.load(io.BytesIO(data))
        n = sum(1 for k in z.files if k.startswith("W") and k != "Wout")
        return cls([(z[f"W{i}"], z[f"b{i}"]) for i in range(n)], (z["Wout"], z["bout"]), str(z["activation"]))


@dataclass
class Bundle:
    """Everything a decision needs except the memory model (which comes from MODEL itself)."""

    meta: dict
    agent: Agent | None = None
    sb3_bytes: bytes | None = None
    quality: QualityModel = field(init=False)
    ladder: MaskLadder = field(init=False)

    def __post_init__(self) -> None:
        self.quality = QualityModel.from_dict(self.meta["quality"])
        self.ladder = MaskLadder.from_dict(self.meta["ladder"])

    @property
    def order(self) -> list[str]:
        return list(self.meta["order"])

    def context(self, memory: MemoryModel):
        from rap.policy.context import PolicyContext

        L = memory.shape.num_layers
        if self.meta.get("num_layers") != L:
            raise RapError(f"this policy was trained for {self.meta.get('model')} with {self.meta.get('num_layers')} "
                           f"layers; the model has {L}: train one for it with rap train-policy")
        return PolicyContext(memory, self.order, self.quality, self.meta.get("scores"), self.meta.get("model", ""),
                             ladder=self.ladder)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, format=FORMAT, quality=self.quality.to_dict(), ladder=self.ladder.to_dict())
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("rap_policy.json", json.dumps(meta))
            if self.agent is not None:
                z.writestr("agent.npz", self.agent.to_npz())
            if self.sb3_bytes is not None:
                z.writestr("sb3_model.zip", self.sb3_bytes)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, with_sb3: bool = False) -> "Bundle":
        path = Path(path)
        if not path.is_file():
            raise RapError(f"policy file {path} does not exist: train one with rap train-policy")
        try:
            with zipfile.ZipFile(path) as z:
                names = set(z.namelist())
                if "rap_policy.json" not in names:
                    raise RapError(f"{path} is not a rap policy file (no rap_policy.json inside)")
                meta = json.loads(z.read("rap_policy.json"))
                agent = Agent.from_npz(z.read("agent.npz")) if "agent.npz" in names else None
                sb3 = z.read("sb3_model.zip") if with_sb3 and "sb3_model.zip" in names else None
        except zipfile.BadZipFile:
            raise RapError(f"{path} is not a zip file (a rap policy file is one)") from None
        if meta.get("format") != FORMAT:
            raise RapError(f"{path} has policy format {meta.get('format')}; this rap reads format {FORMAT}")
        return cls(meta, agent, sb3)


class RLPolicy:
    """The trained agent: features -> masked argmax over (KV ratio, attention blocks kept)."""

    name = "rl"

    def __init__(self, context, agent: Agent):
        self.context = context
        self.agent = agent
        self.ladder = context.ladder
        expected = len(context.kv_ratios) * (self.ladder.num_layers + 1)
        if agent.head[0].shape[0] != expected:
            raise RapError(f"the agent has {agent.head[0].shape[0]} actions, this model's action space has {expected}")

    def decide(self, request: Request, budget_bytes: int):
        ctx = self.context
        costs = ctx.costs(request)
        ctx.check_budget(request, budget_bytes, costs)
        ok, entries = split_choices(ctx, self.ladder, request, costs, budget_bytes)
        action = self.agent.act(observe(ctx, request, budget_bytes, costs), ok)
        mask, r = decode_split(self.ladder, ctx.kv_ratios, action, entries)
        entry = int(entries[action])
        predicted = float(self.ladder.values[entry]) + ctx.quality.kv_penalty(r, request.prompt)
        return ctx.finalize(self.name, mask, r, request, budget_bytes, predicted)
