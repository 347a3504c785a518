"""A rollout in its own process, for the kill-and-restart test: serves synthetic traffic and
ticks the controller until the rollout ends. Usage: python rollout_worker.py STORE_URL PLAN"""

from __future__ import annotations

import random
import sys
import time

from safeshift import FakeModel, Plan, Rollout


def main() -> None:
    url, plan_path = sys.argv[1], sys.argv[2]
    plan = Plan.load(plan_path)
    rollout = Rollout.from_plan(plan, store=url, models={
        "baseline": FakeModel(output=1), "candidate": FakeModel(output=1)})
    rng = random.Random()
    print("ready", flush=True)  # the test's kill clock starts here, not during the imports
    while not rollout.state().phase.terminal:
        for _ in range(200):
            rollout.predict({"x": 1}, unit=f"u{rng.randrange(10**6)}",
                            context={"country": rng.choice(["US", "BR"])})
        d = rollout.tick()
        if d is not None:
            print(f"decision {d.seq} {d.action}", flush=True)
        time.sleep(0.02)
    print("done", rollout.state().phase, flush=True)


if __name__ == "__main__":
    main()
