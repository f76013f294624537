"""Train the RL agent on the joint action (rap.policy.level_rl, MaskablePPO) and measure its distance
from the solver on held-out scenarios (predicted log-PPL ratio; benchmarks/levels.py --policies rl,solver
measures held-out perplexity of both plans).

    nice -n 10 env PYTHONPATH=src OMP_NUM_THREADS=1 python -m benchmarks.level_agent --steps 120000 \\
        --out benchmarks/results/level-agent-smollm2-135m-2026-12-02.zip
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", default=None, help="level profile (default: the bundled one)")
    ap.add_argument("--steps", type=int, default=120_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenarios", type=int, default=300, help="held-out scenarios (seed 10_000 + seed)")
    ap.add_argument("--bytes-device", default="cpu")
    ap.add_argument("--out", required=True, help="the agent's .zip; the evaluation goes beside it as .json")
    args = ap.parse_args(argv)

    from benchmarks.common import environment
    from rap.core.memory import MemoryModel
    from rap.policy import bundled_level_profile
    from rap.policy.level_rl import (LevelAgentPolicy, distance_from_solver, sample_scenario, save_level_agent,
                                     train_level_agent)
    from rap.policy.solver import make_solver
    from rap.sources import load_view

    view, _ = load_view(args.model)
    memory = MemoryModel.from_view(view, on_cuda=args.bytes_device == "cuda")
    profile = args.profile or bundled_level_profile(args.model)
    solver = make_solver(memory, profile)
    agent, record = train_level_agent(solver, steps=args.steps, seed=args.seed)
    record.update({"model": args.model, "profile": str(profile), "bytes_device": args.bytes_device})
    out = save_level_agent(agent, record, args.out)
    policy = LevelAgentPolicy(solver, agent)
    rng = np.random.default_rng(10_000 + args.seed)
    held_out = [sample_scenario(rng, memory) for _ in range(args.scenarios)]
    dist = distance_from_solver(policy, solver, held_out)
    times = []
    for req, b in held_out:
        t = time.perf_counter()
        policy.decide(req, b)
        times.append(time.perf_counter() - t)
    payload = {**environment(view.device), "model": args.model, "training": record, "agent_bytes": out.stat().st_size,
               "held_out": {"scenarios": args.scenarios, "seed": 10_000 + args.seed,
                            "draw": "rap.policy.level_rl.sample_scenario: batch 1-8, prompt 16-1024, 8-256 new "
                                    "tokens, budget U(0.3, 1.0) x dense need"},
               "distance_from_solver": dist,
               "decide_ms": {"p50": float(np.percentile(times, 50) * 1e3), "p99": float(np.percentile(times, 99) * 1e3)}}
    path = out.with_suffix(".json")
    path.write_text(json.dumps(payload, indent=1))
    print(json.dumps({k: payload[k] for k in ("distance_from_solver", "decide_ms", "agent_bytes")}, indent=1))
    print(f"wrote {out} and {path}")


if __name__ == "__main__":
    main()
