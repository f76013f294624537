"""`rap cluster`: `rap serve` on Ray Serve, N replicas with one budget for the cluster (see rap.serve.cluster)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import typer

from rap.errors import RapError

INSTALL_HINT = "pip install 'rap-runtime[cluster]'"


def register(app: typer.Typer) -> None:
    @app.command()
    def cluster(
        model: str = typer.Argument(..., help="known name (rap models), HF folder or .gguf file (on every node)"),
        replicas: int = typer.Option(2, help="replicas (each one Engine); the start count when autoscaling"),
        address: Optional[str] = typer.Option(None, help="join this Ray cluster (auto | HOST:6379 | ray://...); "
                                                         "default: start a local Ray"),
        budget: str = typer.Option("live", help="cluster budget: bytes (12GiB) are a total split over the replicas; "
                                               "live / live:1GiB / 50% / 0.5 apply to each replica's own device; "
                                               "change it with PUT /v1/budget"),
        split: str = typer.Option("equal", help="how a byte total is split: equal | device (by device memory)"),
        port: int = typer.Option(8000, help="TCP port of Ray Serve's HTTP proxy"),
        host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0 for all)"),
        gpus_per_replica: Optional[float] = typer.Option(None, help="GPUs per replica (Ray num_gpus); default 1 "
                                                                    "when the cluster has GPUs, else 0"),
        cpus_per_replica: float = typer.Option(1.0, help="CPUs per replica (Ray num_cpus)"),
        max_ongoing_requests: int = typer.Option(32, help="most requests inside one replica at once (Ray Serve); "
                                                          "the rest wait in the router's queue"),
        min_replicas: Optional[int] = typer.Option(None, help="autoscale: fewest replicas (turns autoscaling on)"),
        max_replicas: Optional[int] = typer.Option(None, help="autoscale: most replicas (turns autoscaling on)"),
        target_ongoing_requests: float = typer.Option(16.0, help="autoscale: ongoing requests per replica that "
                                                                 "Ray Serve aims at"),
        retries: int = typer.Option(2, help="re-sends of a request whose replica died before answering"),
        profile: Optional[Path] = typer.Option(None, help="profile.json: block removal order for the policy"),
        policy: Optional[str] = typer.Option(None, help="policy name (default: rap.policy's default, else greedy)"),
        dtype: Optional[str] = typer.Option(None, help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)"),
        device: Optional[str] = typer.Option(None, help="cuda | cpu (default: cuda where the replica got a GPU)"),
        backend: str = typer.Option("auto", help="auto (rap's fast decoder if usable) | decoder | hf"),
        max_batch: int = typer.Option(32, help="most requests per engine batch"),
        batch_window_ms: float = typer.Option(5.0, help="wait this long after a request for others to batch with"),
        max_tokens_limit: Optional[int] = typer.Option(None, help="refuse max_tokens above this"),
        device_total: Optional[str] = typer.Option(None, help="CPU only: pretend each device has this much memory"),
        threads: Optional[int] = typer.Option(None, help="torch CPU threads per replica (default: Ray's, = CPUs "
                                                         "per replica)"),
    ) -> None:
        """Serve MODEL on Ray Serve: REPLICAS engines behind one OpenAI-compatible endpoint, one cluster budget."""
        try:
            import rap.serve.cluster as rap_cluster
        except ImportError as e:
            raise RapError(f"`rap cluster` needs the cluster extra ({e.name} is missing): {INSTALL_HINT}")
        from rap.cli import console

        if replicas < 1:
            raise RapError("--replicas must be at least 1")
        if split not in ("equal", "device"):
            raise RapError(f"--split {split!r}: use equal or device")
        config = rap_cluster.ReplicaConfig(
            model=model, budget=budget, split=split, dtype=dtype, device=device, backend=backend,
            profile=str(profile) if profile else None, policy=policy, max_batch=max_batch,
            batch_window_s=batch_window_ms / 1e3, max_tokens_limit=max_tokens_limit, device_total=device_total,
            threads=threads)
        deploy = rap_cluster.DeployConfig(
            replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
            target_ongoing_requests=target_ongoing_requests, max_ongoing_requests=max_ongoing_requests,
            gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica, retries=retries)
        deploy.autoscaling  # a bad min/max is one line now
        rap_cluster.budget_from_spec(budget)
        logging.getLogger("ray").setLevel(logging.WARNING)
        console.print(f"rap cluster: starting {replicas} replica(s) of {model} "
                      f"({'joining ' + address if address else 'local Ray'})...")
        url = rap_cluster.start_cluster(config, deploy, address=address, host=host, port=port)
        console.print(f"rap cluster: {url}/v1 (GET/PUT {url}/v1/budget, {url}/metrics); Ctrl-C stops it")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            rap_cluster.stop_cluster()
