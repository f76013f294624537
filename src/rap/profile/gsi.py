"""Greedy Sequential Importance (GSI): remove, one at a time, the block whose removal raises
calibration perplexity least, re-scoring every remaining block after each removal.

The plain algorithm (`naive_gsi`, kept as the reference) runs a full forward pass per candidate:
with m blocks left that is m * (m - 1) block passes per step. `gsi` returns the same order
with far fewer, using three facts:

1. Prefix reuse. Blocks before a candidate see the same input as in the current model. We keep
   the current model's stream at every block boundary (`H[p]`, input of kept block p) and run
   candidate p from `H[p]` onward only: m * (m - 1) / 2 block passes per step. All candidates
   are run as one *wavefront*: at block p, every candidate that started earlier passes block p
   in one batch, then candidate p joins with `H[p]` (it skips block p). The stream of the
   current model rides along as an extra row wherever `H` is stale, which refreshes the cache.
2. Upstream snapshots. After block r is removed, a candidate j < r sees exactly what it saw in
   the previous step up to block r. If we kept its stream at r we resume it there. We cannot
   keep every candidate's stream at every block (m^2 states), so we keep them at the few blocks
   most likely to be removed this step (the lowest scores of the previous step; at step 0 the
   lowest Block Influence): a hit saves r * (r - 1) / 2 passes, a miss costs nothing but memory.
   The result is exact either way.
3. Racing (`Racing`, optional, approximate): score all candidates on a few windows first, drop
   those whose per-window NLL differences to the leader have a lower confidence bound above 0,
   and spend the rest of the windows only on the close ones.

Costs are counted in (block, window) passes and reported per step in units of one block over
the whole calibration set, so exact, racing and naive runs compare directly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rap.errors import RapError
from rap.core.mask import BlockMask
from rap.core.model import BlockView
from rap.profile.calibration import Calibration
from rap.profile.record import Profile, Step, environment, load_profile, model_hash, now, ppl_from_nll
from rap.profile.runner import BlockRunner, check_block_layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Racing:
    """Successive elimination over windows: rounds of `first_windows`, x`growth`, ... windows.

    After each round a candidate is dropped when the lower confidence bound of its mean
    per-window NLL difference to the leader, mean(d) - z * sd(d) / sqrt(n), is above zero.
    """

    first_windows: int = 8
    growth: float = 2.0
    z: float = 3.0
    min_windows: int = 4

    def rounds(self, num_windows: int) -> list[int]:
        sizes, size, used = [], max(1, self.first_windows), 0
        while used < num_windows:
            take = min(int(size), num_windows - used)
            sizes.append(take)
            used += take
            size = max(size * self.growth, size + 1)
        return sizes


# ---- the wavefront ------------------------------------------------------------------------------
class Wavefront:
    """One GSI search's state: the kept blocks, the cached boundary streams, the snapshots.

    `H[p]` ([windows, seq, hidden], on the model's device) is the current model's stream entering
    kept block p (H[m] leaves the last one); `valid[w]` is the last p for which H[p][w] is current.
    With `resident=False` nothing is cached across calls (memory ~ one chunk): each chunk starts
    from the embeddings, which costs m extra block passes per step and disables snapshots.
    """

    def __init__(self, runner: BlockRunner, windows: torch.Tensor, kept: list[str], *, resident: bool = True,
                 chunk_windows: int = 1, batch_windows: int = 8, snapshot_bytes: int = 0):
        self.runner = runner
        self.windows = windows
        self.kept = list(kept)
        self.resident = resident
        self.chunk_windows = max(1, chunk_windows)
        self.batch_windows = max(1, batch_windows)
        self.num_windows = windows.shape[0]
        self.H: list[torch.Tensor | None] = [None] * (len(self.kept) + 1)
        self.valid = torch.full((self.num_windows,), -1, dtype=torch.long)
        self.resume: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (r, rows [r, W, S, D], ok [r, W])
        self.saving: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self.snapshot_bytes = snapshot_bytes  # per snapshot position; windows beyond it are not kept
        self.snapshot_windows = 0  # most windows one snapshot covered (reported)

    @property
    def m(self) -> int:
        return len(self.kept)

    # -- helpers --
    def _device_ids(self, w: torch.Tensor) -> torch.Tensor:
        return self.windows[w].to(self.runner.view.device)

    def _block(self, p: int, x: torch.Tensor) -> torch.Tensor:
        """Block p on [rows, seq, hidden], at most `batch_windows` rows per call."""
        name = self.kept[p]
        if x.shape[0] <= self.batch_windows:
            return self.runner.run_block(name, x)
        return torch.cat([self.runner.run_block(name, x[i:i + self.batch_windows])
                          for i in range(0, x.shape[0], self.batch_windows)])

    def _write_H(self, p: int, w: torch.Tensor, x: torch.Tensor) -> None:
        if self.H[p] is None:
            self.H[p] = torch.empty((self.num_windows, *x.shape[1:]), dtype=x.dtype, device=x.device)
        stale = self.valid[w] < p
        if bool(stale.all()):
            self.H[p][w.to(x.device)] = x
        elif bool(stale.any()):
            self.H[p][w[stale].to(x.device)] = x[stale.to(x.device)]
        self.valid[w] = torch.maximum(self.valid[w], torch.tensor(p))

    def _chunks(self, w_idx: list[int]):
        for i in range(0, len(w_idx), self.chunk_windows):
            yield torch.tensor(w_idx[i:i + self.chunk_windows], dtype=torch.long)

    # -- the dense (current-model) pass --
    @torch.no_grad()
    def current(self, progress=None) -> tuple[torch.Tensor, dict[str, float]]:
        """NLL per window of the current model, and each kept block's Block Influence (ShortGPT:
        1 - cosine similarity of its input and output streams, averaged over tokens); fills H."""
        nll = torch.zeros(self.num_windows, dtype=torch.float64)
        influence = torch.zeros(self.m, dtype=torch.float64)
        tokens = 0
        for w in self._chunks(list(range(self.num_windows))):
            ids = self._device_ids(w)
            h = self.runner.embed(ids)
            if self.resident:
                self._write_H(0, w, h)
            for p in range(self.m):
                out = self._block(p, h)
                cos = torch.nn.functional.cosine_similarity(h.float(), out.float(), dim=-1)
                influence[p] += (1 - cos).sum().item()
                h = out
                if self.resident:
                    self._write_H(p + 1, w, h)
            nll[w] = self.runner.window_nll(h, ids).double().cpu()
            tokens += ids.numel()
            if progress is not None:
                progress(len(w))
        return nll, {name: float(influence[p] / tokens) for p, name in enumerate(self.kept)}

    # -- scoring candidates --
    @torch.no_grad()
    def evaluate(self, cands: list[int], w_idx: list[int], save_at: set[int] = frozenset(),
                 progress=None) -> torch.Tensor:
        """Summed NLL [len(cands), len(w_idx)] (float64) of the model without block `c`, for each
        candidate position c, on windows `w_idx`. At positions in `save_at`, the streams of all
        candidates upstream are kept as snapshots for the next step."""
        out = torch.empty(len(cands), len(w_idx), dtype=torch.float64)
        col = 0
        for w in self._chunks(w_idx):
            out[:, col:col + len(w)] = self._evaluate_chunk(cands, w, save_at)
            col += len(w)
            if progress is not None:
                progress(len(w))
        return out

    def _evaluate_chunk(self, cands: list[int], w: torch.Tensor, save_at) -> torch.Tensor:
        m, device = self.m, self.runner.view.device
        ids = self._device_ids(w)
        c = len(w)
        # Which candidates resume from a snapshot taken at r (all of this chunk's windows present)?
        resumed: list[int] = []
        r = None
        if self.resume is not None:
            r, rows, ok = self.resume
            resumed = [j for j in cands if j < r and bool(ok[j, w].all())]
        fresh = [j for j in cands if j not in resumed]
        fresh_set = set(fresh)
        max_fresh = max(fresh, default=-1)
        valid_c = int(self.valid[w].min()) if self.resident else -1
        base, base_pos = None, None
        if valid_c < 0:  # nothing cached: start from the embeddings
            base, base_pos, valid_c = self.runner.embed(ids), 0, -1
        first = min([*fresh, *([r] if resumed else [])], default=m)
        if base is not None:
            start = 0
        elif max_fresh > valid_c:  # the current model's stream must be carried from valid_c on
            start = min(first, valid_c)
        else:
            start = first

        def stream_at(p: int) -> torch.Tensor:
            if base_pos == p:
                return base
            return self.H[p][w.to(device)]

        active = None  # [rows * c, seq, hidden]
        row_ids: list[int] = []

        def add(rows: torch.Tensor, ids_: list[int]):
            nonlocal active
            active = rows if active is None else torch.cat([active, rows])
            row_ids.extend(ids_)

        for p in range(start, m):
            if resumed and p == r:
                add(self._resumed_rows(resumed, w), resumed)
            if p in save_at and active is not None:
                self._save(p, w, active, row_ids, c)
            need_base_here = p in fresh_set or (p + 1 <= max_fresh and p + 1 > valid_c)
            x_p = stream_at(p) if need_base_here else None
            run_base = p + 1 <= max_fresh and p + 1 > valid_c
            batch = active
            if run_base:
                batch = x_p if batch is None else torch.cat([batch, x_p])
            if batch is not None:
                y = self._block(p, batch)
                n_active = 0 if active is None else active.shape[0]
                active = y[:n_active] if n_active else None
                if run_base:
                    base, base_pos = y[n_active:], p + 1
                    if self.resident:
                        self._write_H(p + 1, w, base)
            if p in fresh_set:
                add(x_p, [p])
        if resumed and r == m:
            add(self._resumed_rows(resumed, w), resumed)
        if active is None:
            return torch.empty(0, c, dtype=torch.float64)
        nll = self.runner.window_nll(active, ids.repeat(len(row_ids), 1)).double().cpu().view(len(row_ids), c)
        index = {j: i for i, j in enumerate(row_ids)}
        return nll[[index[j] for j in cands]]

    def _resumed_rows(self, js: list[int], w: torch.Tensor) -> torch.Tensor:
        rows = self.resume[1]
        j = torch.tensor(js, device=rows.device)
        return rows[j[:, None], w.to(rows.device)[None, :]].flatten(0, 1)

    def _save(self, p: int, w: torch.Tensor, active: torch.Tensor, row_ids: list[int], c: int) -> None:
        """Keep the streams of candidates j < p entering block p, for windows 0..n-1 that fit."""
        if p not in self.saving:
            per_window = p * active[0].numel() * active.element_size()
            n = min(self.num_windows, self.snapshot_bytes // max(1, per_window))
            rows = torch.empty((p, n, *active.shape[1:]), dtype=active.dtype, device=active.device) if n else None
            self.saving[p] = (rows, torch.zeros(p, self.num_windows, dtype=torch.bool))
            self.snapshot_windows = max(self.snapshot_windows, n)
        rows, ok = self.saving[p]
        fits = w < (0 if rows is None else rows.shape[1])
        keep = [i for i, j in enumerate(row_ids) if j < p]
        if not keep or not bool(fits.any()):
            return
        view = active.view(len(row_ids), c, *active.shape[1:])[keep][:, fits.to(active.device)]
        js, ws = torch.tensor([row_ids[i] for i in keep]), w[fits]
        rows[js.to(rows.device)[:, None], ws.to(rows.device)[None, :]] = view
        ok[js[:, None], ws[None, :]] = True

    # -- moving on --
    def remove(self, r: int) -> None:
        """Drop kept block r: H[0..r] stay current, later boundaries go stale; a snapshot taken at
        r (if any) becomes the resume point of the next step."""
        self.kept.pop(r)
        self.H = self.H[:r + 1] + self.H[r + 2:]  # later tensors are kept as storage, marked stale
        self.valid.clamp_(max=r)
        snap = self.saving.get(r)
        self.resume = (r, snap[0], snap[1]) if snap is not None and snap[0] is not None else None
        self.saving = {}


# ---- memory planning ---------------------------------------------------------------------------
def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.7)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 << 30


def plan(view: BlockView, calib: Calibration, predict: int, cache_bytes: int | None,
         blocks_left: int | None = None) -> tuple[bool, int]:
    """(keep the boundary cache resident?, bytes per snapshot position) within `cache_bytes`
    (default: half the free memory). The boundary cache goes first; snapshots share the rest,
    and cover as many windows as fit (all, on small models; a part, on 7B at 128 x 2048)."""
    budget = cache_bytes if cache_bytes is not None else _available_bytes(view.device)
    state = calib.tokens * view.shape.hidden_size * view.shape.dtype_bytes  # one stream, all windows
    m = blocks_left if blocks_left is not None else 2 * view.num_layers
    resident = (m + 1) * state <= budget
    left = budget - (m + 1) * state if resident else budget
    return resident, int(left // predict) if predict > 0 else 0


# ---- the search --------------------------------------------------------------------------------
def _race(wf: Wavefront, cands: list[int], racing: Racing, perm: list[int], save_at, progress):
    """Racing choice among `cands`: (winner position, NLL sums per candidate over the windows it
    saw [len(cands)], windows seen per candidate, full-set NLL sum of the winner)."""
    W = wf.num_windows
    survivors = list(range(len(cands)))
    seen = torch.full((len(cands), W), float("nan"), dtype=torch.float64)
    used = 0
    for size in racing.rounds(W):
        new = perm[used:used + size]
        seen[torch.tensor(survivors)[:, None], torch.tensor(new)[None, :]] = wf.evaluate(
            [cands[i] for i in survivors], new, save_at, progress)
        used += size
        if len(survivors) == 1 or used == W:
            break
        x = seen[survivors][:, perm[:used]]
        leader = int(torch.argmin(x.sum(1)))
        if used >= racing.min_windows:
            d = x - x[leader]
            lcb = d.mean(1) - racing.z * d.std(1, correction=1) / math.sqrt(used)
            survivors = [i for k, i in enumerate(survivors) if k == leader or lcb[k] <= 0]
    x = seen[survivors][:, perm[:used]].sum(1)
    best = survivors[min(range(len(survivors)), key=lambda k: (float(x[k]), survivors[k]))]
    if used < W:
        rest = perm[used:]
        seen[best, rest] = wf.evaluate([cands[best]], rest, frozenset(), progress)[0]
    counts = (~seen.isnan()).sum(1)
    sums = torch.nansum(seen, 1)
    return best, sums, counts, float(seen[best].sum())


def gsi(view: BlockView, calib: Calibration, *, steps: int | None = None, racing: Racing | None = None,
        predict: int = 2, follow: list[str] | None = None, checkpoint: str | Path | None = None,
        resume: bool = True, batch_windows: int = 8, chunk_windows: int | None = None,
        cache_bytes: int | None = None, progress: bool = True, name: str | None = None) -> Profile:
    """Exact GSI (or racing GSI with `racing`) over `steps` removals (default: all 2L blocks).

    `follow`: remove these blocks in this order instead of the argmin (the exact scores and the
    argmin of every step are still recorded: used to audit racing). `checkpoint`: the profile is
    rewritten there after every removal, and a matching incomplete one there is resumed.
    """
    check_block_layout(view)
    runner = BlockRunner(view)
    all_blocks = runner.all_blocks
    total_steps = min(steps if steps is not None else len(all_blocks), len(all_blocks))
    if follow is not None:
        total_steps = min(total_steps, len(follow))
    method = "gsi-racing" if racing else "gsi"
    resident, snapshot_bytes = plan(view, calib, predict, cache_bytes)
    settings = {"racing": vars(racing) if racing else None, "predict": predict, "snapshot_bytes": snapshot_bytes,
                "resident_cache": resident, "dtype": str(view.dtype).replace("torch.", ""),
                "steps_requested": total_steps, "follow": follow is not None}
    versions, device_text = environment(view.device)
    profile = Profile(model=name or view.name, model_hash=model_hash(view), method=method,
                      calibration=calib.describe(), num_layers=view.num_layers, settings=settings,
                      versions=versions, device=device_text, created=now())
    if checkpoint is not None and resume and Path(checkpoint).is_file():
        old = load_profile(checkpoint)
        same = (old.model_hash == profile.model_hash and old.method == method
                and old.calibration.get("ids_sha256") == calib.sha256
                and (old.settings or {}).get("racing") == settings["racing"])
        if same and len(old.order) >= total_steps and old.complete:
            return old
        if same and len(old.order) < total_steps:
            profile = old
            profile.settings.update(settings)
            log.info("resuming %s after %d removals", checkpoint, len(old.order))
    done = len(profile.order)
    mask = BlockMask.from_drop(view.num_layers, profile.order)
    if chunk_windows is None:
        chunk_windows = max(1, batch_windows // 4) if resident else max(1, batch_windows // 8)
    wf = Wavefront(runner, calib.windows, runner.kept_blocks(mask), resident=resident,
                   chunk_windows=chunk_windows, batch_windows=batch_windows, snapshot_bytes=snapshot_bytes)
    tokens = calib.scored_tokens
    W = calib.num_windows
    perm = torch.randperm(W, generator=torch.Generator().manual_seed(calib.seed)).tolist()

    # progress in units of exact work (m(m-1)/2 block passes per step), so the ETA means something
    def step_cost(m: int) -> float:
        return m * (m - 1) / 2 + m

    remaining = [step_cost(wf.m - i) for i in range(total_steps - done)]
    bar = tqdm(total=round(sum(remaining) + wf.m), disable=not progress, desc=f"{method} {profile.model}",
               unit="blk", dynamic_ncols=True)

    t0 = time.perf_counter()
    passes0 = runner.block_window_passes
    nll, influence = wf.current(lambda n: bar.update(wf.m * n / W))
    if profile.dense_ppl is None:
        profile.dense_ppl = ppl_from_nll(float(nll.sum()), tokens)
    setup_seconds = time.perf_counter() - t0
    profile.seconds += setup_seconds
    profile.block_forwards += (runner.block_window_passes - passes0) / W
    # Snapshot positions for this step: the previous step's runners-up, else lowest Block Influence.
    if profile.steps and profile.steps[-1].candidates:
        prev = profile.steps[-1].candidates
        guess = sorted((b for b in prev if b in wf.kept), key=lambda b: prev[b])
    else:
        guess = sorted(wf.kept, key=lambda b: influence[b])

    for step in range(done, total_steps):
        t_step = time.perf_counter()
        passes0 = runner.block_window_passes
        m = wf.m
        cands = list(range(m))
        save_at = {wf.kept.index(b) for b in guess[:predict]} if snapshot_bytes else set()
        shown = [0.0]

        def tick(n: int, unit: float = step_cost(m) / W) -> None:
            shown[0] += unit * n
            bar.update(unit * n)

        if racing is None:
            sums = wf.evaluate(cands, list(range(W)), save_at, tick).sum(1)
            counts = torch.full((m,), W)
            best = min(cands, key=lambda j: (float(sums[j]), j))
        else:
            best, sums, counts, _ = _race(wf, cands, racing, perm, save_at, tick)
        argmin = wf.kept[best]
        removed = follow[step] if follow is not None else argmin
        if removed not in wf.kept:
            raise RapError(f"cannot follow the given order: {removed} is not a kept block at step {step + 1}")
        r = wf.kept.index(removed)
        assert int(counts[r]) == W, "the removed block is always scored on every window"
        ppl_r = ppl_from_nll(float(sums[r]), tokens)
        seconds = time.perf_counter() - t_step
        forwards = (runner.block_window_passes - passes0) / W
        # PPL on the windows each candidate saw (racing drops candidates after fewer windows)
        cand_ppl = {wf.kept[j]: ppl_from_nll(float(sums[j]), int(counts[j]) * (calib.seq_len - 1)) for j in cands}
        profile.steps.append(Step(
            removed=removed, seconds=round(seconds, 3), block_forwards=round(forwards, 4), ppl=ppl_r,
            candidates=cand_ppl, windows={wf.kept[j]: int(counts[j]) for j in cands} if racing else {},
            argmin=argmin if follow is not None else None))
        profile.order.append(removed)
        profile.ppl_after.append(ppl_r)
        profile.seconds += seconds
        profile.block_forwards += forwards
        guess = [b for b in sorted(cand_ppl, key=lambda b: cand_ppl[b]) if b != removed]
        wf.remove(r)
        profile.complete = step + 1 == total_steps
        if checkpoint is not None:
            profile.save(checkpoint)
        bar.update(max(0.0, step_cost(m) - shown[0]))  # racing does less than the exact estimate
        bar.set_postfix_str(f"-{removed} ppl {ppl_r:.2f}", refresh=False)
        log.info("step %d: -%s ppl %.3f (%.1fs, %.1f block forwards)", step + 1, removed, ppl_r, seconds, forwards)
    bar.close()
    profile.settings["snapshot_windows"] = wf.snapshot_windows
    profile.complete = True
    if checkpoint is not None:
        profile.save(checkpoint)
    return profile


# ---- the reference ------------------------------------------------------------------------------
@torch.no_grad()
def naive_gsi(view: BlockView, calib: Calibration, *, steps: int | None = None, batch_size: int = 8,
              progress: bool = True) -> Profile:
    """The plain algorithm, kept obviously correct: for every candidate, mask it out and run the
    whole forward (rap.core.forward, equal to the stock forward: tests/test_forward.py) over all windows.
    m * (m - 1) block passes per step."""
    from rap.eval.perplexity import window_nll
    from rap.core.forward import forward_for

    fwd = forward_for(view)

    all_blocks = [b.name for b in view.blocks]
    total_steps = min(steps if steps is not None else len(all_blocks), len(all_blocks))
    versions, device_text = environment(view.device)
    profile = Profile(model=view.name, model_hash=model_hash(view), method="gsi-naive",
                      calibration=calib.describe(), num_layers=view.num_layers,
                      settings={"dtype": str(view.dtype).replace("torch.", ""), "batch_size": batch_size},
                      versions=versions, device=device_text, created=now())
    W, tokens = calib.num_windows, calib.scored_tokens

    def nll_sum(mask: BlockMask) -> float:
        per_window = []
        for i in range(0, W, batch_size):
            ids = calib.windows[i:i + batch_size].to(view.device)
            per_window.append(window_nll(fwd.logits(ids, mask), ids).double().cpu())
        return float(torch.cat(per_window).sum())

    t0 = time.perf_counter()
    mask = BlockMask.full(view.num_layers)
    profile.dense_ppl = ppl_from_nll(nll_sum(mask), tokens)
    profile.block_forwards += len(all_blocks)
    profile.seconds += time.perf_counter() - t0
    for _ in tqdm(range(total_steps), desc="gsi-naive", disable=not progress):
        t_step = time.perf_counter()
        kept = [b for b in all_blocks if mask.keeps(b)]
        sums = {b: nll_sum(mask.drop(b)) for b in kept}
        best = min(kept, key=lambda b: (sums[b], kept.index(b)))
        seconds = time.perf_counter() - t_step
        forwards = float(len(kept) * (len(kept) - 1))
        ppl = ppl_from_nll(sums[best], tokens)
        profile.steps.append(Step(removed=best, seconds=round(seconds, 3), block_forwards=forwards, ppl=ppl,
                                  candidates={b: ppl_from_nll(s, tokens) for b, s in sums.items()}))
        profile.order.append(best)
        profile.ppl_after.append(ppl)
        profile.seconds += seconds
        profile.block_forwards += forwards
        mask = mask.drop(best)
    profile.complete = True
    return profile
