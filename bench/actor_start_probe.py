"""Actor start probe: what one Ray actor costs to start, with and without a ``runtime_env``.

Each scenario runs in a fresh local Ray (a child process of its own): ``--actors`` actors
created one after another (each timed from ``.remote()`` to its first answered call), then
``--actors`` created at once (timed until all answered), after one warm-up actor. The actors
are ``num_cpus=0``, like lagompy's read-side workers and topic subscribers.

* ``none``: no runtime_env anywhere (Ray hands out its pre-started workers);
* ``actor-env``: a per-actor ``runtime_env`` with ``env_vars: PYTHONPATH`` (what every lagompy
  actor had: each start needs a new worker process set up for that environment);
* ``job-env``: the same ``runtime_env`` given once to ``ray.init``, actors with none;
* ``job+actor-env``: both, the actor's equal to the job's (the test suite's Ray before);
* ``lagompy``: ``lagompy.start`` of the example's users (2 hosts) then its read side on Ray
  (4 workers), in a Ray that lagompy starts, twice (two apps: the first pays for Ray's start);
  SQLite file journal, projection in the same file;
* ``lagompy-actor-env``: the same with every actor given a runtime_env, as before.

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

SCENARIOS = ("none", "actor-env", "job-env", "job+actor-env", "lagompy", "lagompy-actor-env")


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


def run_lagompy(scenario: str) -> dict[str, Any]:
    """In this process: two apps started in a Ray that lagompy starts, the timings."""
    import asyncio
    import tempfile

    import lagompy.readside._ray
    import lagompy.runtime._ray
    from examples.user_service.entity import UserEntity
    from examples.user_service.projection import UsersProjection
    from lagompy import start
    from lagompy.readside import start_readside_on_ray
    from lagompy.runtime import shutdown_app

    if scenario == "lagompy-actor-env":
        from lagompy.runtime._loading import import_roots

        def every_actor(classes: Any) -> dict[str, Any]:
            return {"env_vars": {"PYTHONPATH": ":".join(import_roots(classes))}}

        lagompy.runtime._ray.actor_runtime_env = every_actor  # type: ignore[attr-defined]
        lagompy.readside._ray.actor_runtime_env = every_actor  # type: ignore[attr-defined]

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {"scenario": scenario}
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/j.db"
            for i in (1, 2):
                app = f"probe-{i}"
                t0 = time.perf_counter()
                entities = await start(app=app, entities=[UserEntity], journal_url=url, hosts=2)
                out[f"start_{i}_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                readside = await start_readside_on_ray([UsersProjection], app=app, journal_url=url)
                out[f"readside_{i}_s"] = time.perf_counter() - t0
                await readside.close()
                await shutdown_app(app)
                await entities.close()
        return out

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actors", type=int, default=6)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child.startswith("lagompy"):
            result = run_lagompy(args.child)
        else:
            result = run_scenario(args.child, args.actors)
        print(json.dumps(result))
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
            if scenario.startswith("lagompy"):
                print(
                    f"{scenario:<18} start {r['start_1_s']:5.2f} s + read side "
                    f"{r['readside_1_s']:5.2f} s (Ray starting); again {r['start_2_s']:5.2f} s "
                    f"+ {r['readside_2_s']:5.2f} s   (run {run + 1})",
                    flush=True,
                )
                continue
            print(
                f"{scenario:<14} {r['init_s']:5.2f} s {r['first_s']:5.2f} s "
                f"{r['sequential_median_s']:8.2f} s {r['sequential_max_s']:6.2f} s "
                f"{r['together_s']:8.2f} s   (run {run + 1})",
                flush=True,
            )


if __name__ == "__main__":
    main()
