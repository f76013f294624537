"""The level policy where users meet it: the engine's and `rap decide`'s default for a model that ships a
level profile, bad input in one line, and the RL agent on the joint action (rap.policy.level_rl)."""

import numpy as np
import pytest

from conftest import run_rap as rap
from rap.core.memory import Request
from rap.core.plan import DROP, DTYPE, Plan


@pytest.fixture(scope="module")
def smollm2_memory():
    from rap.sources import planning_memory

    return planning_memory("smollm2-135m", "fp32")


def test_a_model_with_a_level_profile_is_served_by_its_plan_library_by_default(smollm2_memory):
    from rap.policy.greedy import as_policy
    from rap.policy.library import LibrarySolver
    from rap.policy.precision import PrecisionLadder

    policy = as_policy(None, smollm2_memory, None, "smollm2-135m")
    assert isinstance(policy, LibrarySolver) and len(policy) > 100  # the shipped profile's measured plans
    assert isinstance(as_policy(None, smollm2_memory, None, "stories260k"), PrecisionLadder)  # no level profile
    req = Request(1, 512, 128)
    budget = int(0.5 * smollm2_memory.dense_need(req))
    d = policy.decide(req, budget)
    assert d.predicted_peak_bytes <= budget and smollm2_memory.fits(budget, d.mask, req, d.kv_ratio)
    assert isinstance(d.mask, Plan) and d.mask.is_quantized and d.policy == "library"


def test_rap_decide_defaults_to_the_plan_library_and_names_the_smallest_configuration():
    out = rap("decide", "smollm2-135m", "--budget", "300MiB", "--dtype", "fp32", "--json")
    assert out.returncode == 0, out.stderr
    import json

    assert json.loads(out.stdout)["policy"] == "library"
    out = rap("decide", "smollm2-135m", "--budget", "10MiB")
    assert out.returncode == 2 and "smallest configuration" in out.stderr + out.stdout
    assert len((out.stderr + out.stdout).strip().splitlines()) == 1


@pytest.mark.parametrize("plan, words", [("ffn.1=int3", "unknown level"),
                                         ("ffn.2=int4g32", "does not divide down_proj's in_features 172")])
def test_bad_levels_on_the_command_line_get_one_line_and_exit_code_2(plan, words):
    out = rap("memory", "stories260k", "--plan", plan)
    text = (out.stderr + out.stdout).strip()
    assert out.returncode == 2 and words in text and len(text.splitlines()) == 1


def _tiny_solver(memory_fixture):
    from rap.policy.solver import make_solver

    rng = np.random.default_rng(0)
    prof = {"single": {b: {"int8": float(rng.uniform(0, 0.01)), "int4g64": float(rng.uniform(0.01, 0.05)),
                           DROP: float(rng.uniform(0.2, 2.0))} for b in memory_fixture.dense_block_bytes}}
    return make_solver(memory_fixture, prof)


@pytest.fixture(scope="module")
def memory(stories):
    from rap.core.memory import MemoryModel

    return MemoryModel.from_view(stories[0], on_cuda=False)


def test_level_env_masks_keep_every_episode_within_the_budget(memory):
    from rap.policy.level_rl import LevelEnv

    solver = _tiny_solver(memory)
    env = LevelEnv(solver, seed=1)
    rng = np.random.default_rng(2)
    for _ in range(20):
        obs, _ = env.reset()
        done, ret = False, 0.0
        while not done:
            allowed = np.flatnonzero(env.action_masks())
            obs, r, done, _, _ = env.step(int(rng.choice(allowed)))
            ret += r
        core = env.unwrapped.core
        plan = core.plan()
        bd = memory.breakdown(plan, core.request, core.kv_ratio)
        assert bd.total_bytes <= core.budget  # a random masked agent never overspends
        assert ret == pytest.approx(-core.predicted)  # the return is minus the predicted log ratio


def test_a_trained_level_agent_decides_fitting_plans_no_better_than_the_solver(memory, tmp_path):
    from rap.policy.level_rl import (LevelAgentPolicy, distance_from_solver, load_level_agent, sample_scenario,
                                     save_level_agent, train_level_agent)

    solver = _tiny_solver(memory)
    agent, record = train_level_agent(solver, steps=2048, seed=0)
    path = save_level_agent(agent, record, tmp_path / "agent.zip")
    agent, record = load_level_agent(path)
    assert record["algorithm"] == "sb3-contrib MaskablePPO"
    rng = np.random.default_rng(3)
    scenarios = [sample_scenario(rng, memory) for _ in range(20)]
    policy = LevelAgentPolicy(solver, agent)
    for req, b in scenarios:
        d = policy.decide(req, b)
        assert memory.fits(b, d.mask, req, d.kv_ratio)
    dist = distance_from_solver(policy, solver, scenarios)
    assert dist["misfits"] == 0 and dist["solver_at_least_as_good"] >= 0.95  # the solver is exact to a bucket
