"""Actor start probe: what one Ray actor costs to start, with and without a ``runtime_env``.

Each scenario runs in a fresh local Ray (a child process of its own): ``--actors`` actors
created one after another (each timed from ``.remote()`` to its first answered call), then
``--actors`` created at once (timed until all answered), after one warm-up actor. The actors
are ``num_cpus=0``, like lagompy's read-side workers and topic subscribers.

* ``none``: no runtime_env anywhere (Ray hands out its pre-started workers);
* ``actor-env``: a per-actor ``runtime_env`` with ``env_vars: PYTHONPATH`` (what every lagompy
  actor had: each start needs a new worker process set up for that environment);
* ``job-env``: the same ``runtime_env`` given once to ``ray.init``, actors with none;
* ``job+actor-env``: both, the actor's equal to the job's (the test suite's Ray before).

Prints only (the numbers, with the command and the CPU reference, are quoted by hand in
docs/benchmarks.md).

    .venv/bin/python bench/actor_start_probe.py
    .venv/bin/python bench/actor_start_probe.py --actors 8 --scenarios none actor-env
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench._report import cpu_reference  # noqa: E402

SCENARIOS = ("none", "actor-env", "job-env", "job+actor-env")


class Probe:
    def ping(self) -> int:
        return 1


def run_scenario(scenario: str, actors: int) -> dict[str, Any]:
    """In this process: a fresh Ray, the timings of one scenario."""
    import logging

    import ray

    env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
    job_env = env if scenario in ("job-env", "job+actor-env") else None
    actor_env = env if scenario in ("actor-env", "job+actor-env") else None
    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=150 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env=job_env,
    )
    init = time.perf_counter() - t0
    remote: Any = ray.remote(Probe)

    def make() -> Any:
        options: dict[str, Any] = {"num_cpus": 0}
        if actor_env is not None:
            options["runtime_env"] = actor_env
        return remote.options(**options).remote()

    t0 = time.perf_counter()
    warm = make()
    ray.get(warm.ping.remote())
    first = time.perf_counter() - t0
    sequential = []
    made = [warm]
    for _ in range(actors):
        t0 = time.perf_counter()
        handle = make()
        ray.get(handle.ping.remote())
        sequential.append(time.perf_counter() - t0)
        made.append(handle)
    t0 = time.perf_counter()
    batch = [make() for _ in range(actors)]
    ray.get([h.ping.remote() for h in batch])
    together = time.perf_counter() - t0
    for handle in [*made, *batch]:
        ray.kill(handle)
    ray.shutdown()
    return {
        "scenario": scenario,
        "init_s": init,
        "first_s": first,
        "sequential_median_s": statistics.median(sequential),
        "sequential_max_s": max(sequential),
        "together_s": together,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=6)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_scenario(args.child, args.actors)))
        return
    cpu = cpu_reference()
    print(f"CPU reference: {cpu:.1f} ms (sum(range(10**6))); {args.actors} actors a scenario")
    print(f"scenario        init   first  seq median  seq max  {args.actors} at once")
    for run in range(args.runs):
        for scenario in args.scenarios:
            done = subprocess.run(
                [sys.executable, __file__, "--child", scenario, "--actors", str(args.actors)],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO_ROOT,
            )
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{scenario:<14} {r['init_s']:5.2f} s {r['first_s']:5.2f} s "
                f"{r['sequential_median_s']:8.2f} s {r['sequential_max_s']:6.2f} s "
                f"{r['together_s']:8.2f} s   (run {run + 1})",
                flush=True,
            )


if __name__ == "__main__":
    main()
