#!/usr/bin/env python3
"""Records gymnasium trajectories that ddppo-env's parity tests replay.

For each of the six MuJoCo tasks this makes gymnasium 1.4.0's v5 env with
the keyword arguments that give the v2 observation and reward terms, resets
it, and records the initial qpos/qvel, uniformly random actions, and what
gymnasium returns for each step (observation, reward, terminated). Two runs
per task: one of up to RUN_STEPS steps, and one that ends in termination
(HalfCheetah never terminates; its second run is a second plain run).

Usage (from the repository root; makes the venv on first use):

    python3 crates/ddppo-env/scripts/record_gymnasium.py

The venv lives in .cache/venv-gym (git-ignored); the fixtures are written to
crates/ddppo-env/tests/fixtures/<task>.json. Floats are written with
Python's repr, which round-trips exactly.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
VENV = ROOT / ".cache" / "venv-gym"
# gymnasium imports imageio and packaging for its MuJoCo renderer (its `mujoco` extra).
PINS = ["gymnasium==1.4.0", "mujoco==3.17.0", "numpy", "imageio", "packaging"]
OUT = ROOT / "crates" / "ddppo-env" / "tests" / "fixtures"
RUN_STEPS = 80
TERMINATING_MAX_STEPS = 200


def ensure_venv():
    """Re-runs this script inside .cache/venv-gym, creating it when missing."""
    python = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PINS], check=True)
    os.execv(str(python), [str(python), __file__, *sys.argv[1:]])


def tasks(assets):
    """name -> (gymnasium id, kwargs giving v2 observations and reward terms)."""
    return {
        "inverted-pendulum": ("InvertedPendulum-v5", {}),
        "hopper": ("Hopper-v5", {}),
        # v2 used walker2d.xml; v5's default is walker2d_v5.xml.
        "walker2d": ("Walker2d-v5", {"xml_file": str(assets / "walker2d.xml")}),
        "half-cheetah": ("HalfCheetah-v5", {}),
        # Truncated observation (no contact forces) and no contact cost, as
        # v2 on MuJoCo 2.0, where cfrc_ext stayed zero.
        "ant": ("Ant-v5", {"include_cfrc_ext_in_observation": False, "contact_cost_weight": 0.0}),
        "humanoid": (
            "Humanoid-v5",
            {
                "include_cinert_in_observation": False,
                "include_cvel_in_observation": False,
                "include_qfrc_actuator_in_observation": False,
                "include_cfrc_ext_in_observation": False,
                "contact_cost_weight": 0.0,
            },
        ),
    }


def record_run(env, np, seed, max_steps, kick=None, action_scale=1.0):
    """One run: reset(seed), optionally add `kick` to qvel, uniformly random
    actions in the action box scaled by `action_scale`."""
    env.reset(seed=seed)
    inner = env.unwrapped
    if kick is not None:
        inner.set_state(inner.data.qpos.copy(), inner.data.qvel.copy() + np.asarray(kick))
    qpos, qvel = inner.data.qpos.copy(), inner.data.qvel.copy()
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low.astype(np.float64), env.action_space.high.astype(np.float64)
    run = {
        "seed": seed,
        "qpos": qpos.tolist(),
        "qvel": qvel.tolist(),
        "obs0": inner._get_obs().tolist(),
        "actions": [],
        "obs": [],
        "rewards": [],
        "terminated": [],
    }
    for _ in range(max_steps):
        action = action_scale * rng.uniform(low, high)
        obs, reward, terminated, truncated, _ = env.step(action)
        run["actions"].append(action.tolist())
        run["obs"].append(np.asarray(obs, dtype=np.float64).tolist())
        run["rewards"].append(float(reward))
        run["terminated"].append(bool(terminated))
        if terminated or truncated:
            break
    return run


def main():
    ensure_venv()
    import gymnasium as gym
    import mujoco
    import numpy as np

    # MuJoCo appends its warnings to MUJOCO_LOG.TXT in the working directory;
    # keep that file out of the source tree.
    os.chdir(VENV.parent)
    assets = Path(gym.__file__).parent / "envs" / "mujoco" / "assets"
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (env_id, kwargs) in tasks(assets).items():
        env = gym.make(env_id, **kwargs)
        # Full-range random actions topple the inverted pendulum within a few
        # steps; small ones give a longer first run.
        scale = 0.05 if name == "inverted-pendulum" else 1.0
        runs = [record_run(env, np, seed=1, max_steps=RUN_STEPS, action_scale=scale)]
        if name != "half-cheetah":
            terminating = None
            # Should random actions never end an episode (Ant can stay
            # upright), an upward kick of the root makes it leave the
            # healthy z range.
            for kick_z in (None, 2.0):
                for seed in range(2, 50):
                    kick = None
                    if kick_z is not None:
                        kick = np.zeros(env.unwrapped.model.nv)
                        kick[2] = kick_z
                    run = record_run(env, np, seed=seed, max_steps=TERMINATING_MAX_STEPS, kick=kick,
                                     action_scale=1.0)
                    if run["terminated"][-1]:
                        terminating = run
                        break
                if terminating is not None:
                    break
            if terminating is None:
                sys.exit(f"no terminating run found for {name}")
            runs.append(terminating)
        else:
            runs.append(record_run(env, np, seed=2, max_steps=RUN_STEPS))
        fixture = {
            "task": name,
            "gymnasium_id": env_id,
            "kwargs": {k: (Path(v).name if k == "xml_file" else v) for k, v in kwargs.items()},
            "gymnasium": gym.__version__,
            "mujoco": mujoco.__version__,
            "runs": runs,
        }
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
        print(f"{path.relative_to(ROOT)}: " + ", ".join(
            f"{len(r['actions'])} steps{' (terminated)' if r['terminated'][-1] else ''}" for r in runs))
        env.close()


if __name__ == "__main__":
    main()
