#!/usr/bin/env python3
"""A current checkpoint (format ddppo-checkpoint/2) as a run directory that
865bef1's `ddppo train --resume` continues (format ddppo-checkpoint/1).

Why: the speed targets compare this code with 865bef1 side by side at
20,000 transitions, and 865bef1 needs hours to get there on a 2-core
machine. With `model.cold_start_wait = 0` and `jacobian_states = 0` the
current code computes what 865bef1 computes, value for value, so its
checkpoint at step s is 865bef1's state at step s in another layout; this
script writes that layout, and both codes time the same next segment from
one state.

    python3 benches/format1.py CHECKPOINT_DIR NEW_RUN_DIR --epochs E [--paper] [--checkpoint-every C]
    python3 benches/format1.py CHECKPOINT_DIR --compare FORMAT1_CHECKPOINT_DIR

The first form writes NEW_RUN_DIR/config.toml (the checkpoint's config in
865bef1's keys, with `epochs = E` and, if given, `checkpoint_every = C`),
NEW_RUN_DIR/checkpoints/step-N/ and NEW_RUN_DIR/metrics.jsonl (the source
run's lines up to step N, if found); then `ddppo-865bef1 train --resume
NEW_RUN_DIR` runs steps N to E x `epoch_length`. Its checkpoints carry
`wall_s` and `phase_s`, so a short `checkpoint_every` times a part of a
segment where a whole one takes too long. The second form converts in
memory and compares the result with a checkpoint 865bef1 wrote at the same
step of the same run, tensor for tensor and field for field (the
wall-clock figures and `epochs` excepted); it exits 1 on any difference.

A config that uses a setting 865bef1 does not have (a non-zero
`cold_start_wait` or `jacobian_states`, ...) is refused: 865bef1 would
compute something else from that state. The speed options
(`gradient.directions_per_step`, `model.warm_max_epochs`) too, unless
`--paper` drops them: then 865bef1 continues, under the paper's schedule, a
state that a run with the options reached (compare it with this code's
branch `ddppo train --from CHECKPOINT_DIR --set gradient.directions_per_step=0
...`).
Standard library only.
"""

import argparse
import json
import re
import struct
import sys
import tomllib
from pathlib import Path

FORMAT_NEW = "ddppo-checkpoint/2"
FORMAT_OLD = "ddppo-checkpoint/1"
ENSEMBLE_FORMAT_OLD = "ddppo-ensemble-v1"
ENSEMBLES = ("prediction", "gradient")
# The config keys added since 865bef1, with the value that means 865bef1's
# behaviour (the key is dropped when it has it; otherwise refused).
ADDED = {
    ("jacobian_states",): 0,
    ("jacobian_directions",): None,  # unused when jacobian_states = 0
    ("model", "cold_start_wait"): 0,
}
# The speed options (absent or 0: the paper's schedule). `--paper` drops
# them, so that 865bef1 continues a state an option run reached under the
# paper's schedule; without it they are refused.
OPTIONS = {("gradient", "directions_per_step"): 0, ("model", "warm_max_epochs"): None}
# 865bef1's ensemble metadata: these keys of [model], in this order.
ENSEMBLE_KEYS = (
    "ensemble_size", "elites", "hidden", "hidden_layers", "weight_decay", "lr",
    "batch_size", "holdout_ratio", "max_holdout", "patience", "improvement",
)
ENSEMBLE_TAIL = ("max_logvar_init", "min_logvar_init", "logvar_bound_penalty")
# Section tables 865bef1 knows, and the keys it knows in each (everything
# else in the current config is a setting it does not have).
OLD_SECTIONS = {
    "model": set(ENSEMBLE_KEYS) | set(ENSEMBLE_TAIL) | {"max_epochs"},
    "gradient": {"neighbours", "weight", "neighbour_set", "standardise_search"},
}
OLD_TOP = {
    "alpha_lr", "batch_size", "checkpoint_every", "critic_grad_clip", "critic_lr",
    "critic_updates_per_step", "epoch_length", "epochs", "eval_episodes", "eval_every",
    "eval_workers", "gamma", "hidden", "horizon", "init_alpha", "learn_alpha",
    "max_train_repeat_per_step", "min_pool_size", "model_train_freq", "policy_grad_clip",
    "policy_lr", "policy_updates_per_step", "real_ratio", "replay_size", "retain_epochs",
    "rollout_batch_size", "rollout_schedule", "seed", "start_steps", "task", "tau", "variant",
    "target_entropy", "double_params_hidden",
}
OLD_PHASES = ("collect", "model_train", "model_rollout", "critic", "policy", "eval")


class Refused(Exception):
    pass


def read_safetensors(path):
    """{name: (dtype, shape, bytes)} of a safetensors file."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}
    for name, t in header.items():
        a, b = t["data_offsets"]
        out[name] = (t["dtype"], list(t["shape"]), data[base + a : base + b])
    return out


def safetensors_bytes(tensors):
    header, offset, chunks = {}, 0, []
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        chunks.append(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(chunks)


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def old_config(text, top=None, paper=False):
    """The current config's TOML in 865bef1's keys (refused if it uses a
    setting 865bef1 does not have; the speed options dropped if `paper`;
    the top-level keys in `top` set to its values)."""
    top = top or {}
    dropped = ADDED | OPTIONS
    cfg = tomllib.loads(text)
    for key, value in cfg.items():
        if isinstance(value, dict):
            known = OLD_SECTIONS.get(key)
            if known is None:
                raise Refused(f"section [{key}] does not exist in 865bef1")
            for k in value:
                if k not in known and (key, k) not in dropped:
                    raise Refused(f"`{key}.{k}` does not exist in 865bef1")
        elif key not in OLD_TOP and (key,) not in ADDED:
            raise Refused(f"`{key}` does not exist in 865bef1")
    for path, want in (ADDED if paper else dropped).items():
        node = cfg
        for p in path[:-1]:
            node = node.get(p, {})
        have = node.get(path[-1])
        if have is not None and have != want and (want is not None or path in OPTIONS):
            hint = " (--paper drops it)" if path in OPTIONS else ""
            only = "no such setting" if want is None else f"only `{want}`"
            raise Refused(f"`{'.'.join(path)} = {have}`: 865bef1 has {only}{hint}")
    # Drop the added keys line by line (the rest of the text stays as written).
    out, section = [], ()
    for line in text.splitlines():
        m = re.match(r"\s*\[([A-Za-z_]+)\]\s*$", line)
        if m:
            section = (m.group(1),)
        k = re.match(r"\s*([A-Za-z_]+)\s*=", line)
        if k and section + (k.group(1),) in dropped:
            continue
        if k and not section and k.group(1) in top:
            line = f"{k.group(1)} = {top[k.group(1)]}"
        out.append(line)
    missing = sorted(set(top) - set(cfg))
    if missing:
        raise Refused(f"the checkpoint's config has no top-level `{missing[0]}` to set")
    return "\n".join(out) + "\n", cfg


def convert(src, paper=False, top=None):
    """(files, env_steps, config dict): 865bef1's checkpoint files, in memory,
    for the current checkpoint directory `src` (its config with the top-level
    keys in `top` set to their values)."""
    src = Path(src)
    if not (src / "MANIFEST.json").is_file():
        raise Refused(f"{src} is not a complete checkpoint directory (no MANIFEST.json; give RUN/checkpoints/step-N)")
    manifest = json.loads((src / "MANIFEST.json").read_text())
    if manifest.get("format") != FORMAT_NEW:
        raise Refused(f"{src}: format `{manifest.get('format')}` is not `{FORMAT_NEW}`")
    state = json.loads((src / "state.json").read_text())
    run = state["run"]
    if run["mid_step"]:
        raise Refused(f"{src}: written inside an interrupted model training (865bef1 has no such state)")
    if run.get("diverged_episodes", 0):
        raise Refused(f"{src}: {run['diverged_episodes']} diverged episodes (865bef1 keeps no such count)")
    config_text, cfg = old_config(state["config"], top, paper)
    clock = json.loads((src / "clock.json").read_text())
    tensors = read_safetensors(src / "networks.safetensors")

    networks, ensembles, steps = {}, {e: {} for e in ENSEMBLES}, {}
    for name, t in tensors.items():
        head, _, rest = name.partition("/")
        if head in ENSEMBLES:
            ensembles[head][rest] = t
        elif head == "opt" and name.endswith("/step"):
            dtype, shape, raw = t
            if dtype != "I64" or shape != [1]:
                raise Refused(f"{name}: {dtype} {shape}, expected I64 [1]")
            steps[name.split("/")[1]] = struct.unpack("<q", raw)[0]
        else:
            networks[name] = t
    files = {"networks.safetensors": networks}
    model = cfg["model"]
    for e, ts in ensembles.items():
        if not ts:
            continue
        obs_dim = len(run["obs"])
        in_dim = ts["scaler.mean"][1][0]
        meta = {
            "format": ENSEMBLE_FORMAT_OLD,
            "obs_dim": obs_dim,
            "act_dim": in_dim - obs_dim,
            "config": {
                **{k: model[k] for k in ENSEMBLE_KEYS},
                "max_epochs": model.get("max_epochs"),
                **{k: model[k] for k in ENSEMBLE_TAIL},
            },
        }
        raw = json.dumps(meta, separators=(",", ":")).encode()
        files[f"{e}.safetensors"] = {**ts, "meta.json": ("U8", [len(raw)], raw)}

    old_state = {
        "format": FORMAT_OLD,
        "config": config_text,
        "env_steps": run["env_steps"],
        "critic_updates": run["critic_updates"],
        "policy_updates": run["policy_updates"],
        "model_trainings": run["model_trainings"],
        "rollout_length": run["rollout_length"],
        "obs": run["obs"],
        "env_state": state["env_state"],
        "episode_return": run["episode_return"],
        "last_train_return": run["last_train_return"],
        "critic_loss": [run["critic_loss"]["sum"], run["critic_loss"]["n"]],
        "policy_loss": [run["policy_loss"]["sum"], run["policy_loss"]["n"]],
        "model_loss": run["model_stats"]["loss"],
        "model_holdout_mse": run["model_stats"]["holdout"],
        "grad_loss": run["model_stats"]["grad"],
        "phase_s": {k: clock["phase_s"][k] for k in OLD_PHASES},
        "wall_s": clock["wall_s"],
        "rngs": run["rngs"],
        "optimizer_steps": steps,
    }
    files["state.json"] = old_state
    for b in ("env_buffer.bin", "model_buffer.bin"):
        files[b] = src / b
    return files, run["env_steps"], cfg


def write(src, out, epochs, paper=False, checkpoint_every=None):
    out = Path(out)
    if out.exists():
        raise Refused(f"{out} exists (pick a new run directory)")
    if checkpoint_every is not None and checkpoint_every < 0:
        raise Refused(f"--checkpoint-every {checkpoint_every}: give 0 (only at the end) or more env steps")
    top = {"epochs": epochs}
    if checkpoint_every is not None:
        top["checkpoint_every"] = checkpoint_every
    files, step, cfg = convert(src, paper, top)
    end = epochs * cfg["epoch_length"]
    if end <= step:
        raise Refused(f"--epochs {epochs} ends at {end} env steps, not after the checkpoint's step {step}")
    ck = out / "checkpoints" / f"step-{step:010d}"
    ck.mkdir(parents=True)
    (out / "config.toml").write_text(files["state.json"]["config"])
    sums = {}
    for name, content in files.items():
        if name == "state.json":
            data = json.dumps(content, indent=2).encode()
        elif isinstance(content, Path):
            data = content.read_bytes()
        else:
            data = safetensors_bytes(content)
        (ck / name).write_bytes(data)
        sums[name] = {"bytes": len(data), "fnv1a64": f"{fnv1a64(data):016x}"}
    (ck / "MANIFEST.json").write_text(json.dumps({"format": FORMAT_OLD, "env_steps": step, "files": sums}, indent=2))
    # The source run's metrics up to the step (865bef1 keeps them on resume).
    metrics = Path(src).parent.parent / "metrics.jsonl"
    if metrics.is_file():
        keep = [l for l in metrics.read_text().splitlines() if l.strip() and json.loads(l)["env_steps"] <= step]
        (out / "metrics.jsonl").write_text("".join(l + "\n" for l in keep))
    print(f"wrote {out} (865bef1 format, step {step} of {end}); run: ddppo-865bef1 train --resume {out}")


def compare(src, old):
    """Differences between the conversion of `src` and 865bef1's checkpoint `old`."""
    files, _, _ = convert(src)
    old = Path(old)
    diffs = []
    ostate = json.loads((old / "state.json").read_text())
    nstate = files["state.json"]
    ocfg, ncfg = tomllib.loads(ostate["config"]), tomllib.loads(nstate["config"])
    # `epochs` is where a run ends, which a continuation changes.
    keys = sorted(k for k in set(ocfg) | set(ncfg) if k != "epochs" and ocfg.get(k) != ncfg.get(k))
    if keys:
        diffs.append(f"config: {keys}")
    for k in sorted(set(ostate) | set(nstate)):
        if k in ("config", "wall_s", "phase_s"):
            continue
        if ostate.get(k) != nstate.get(k):
            diffs.append(f"state.json `{k}`: {str(ostate.get(k))[:80]} != {str(nstate.get(k))[:80]}")
    if set(ostate["phase_s"]) != set(nstate["phase_s"]):
        diffs.append("state.json `phase_s`: other phases")
    for name, content in files.items():
        if name == "state.json":
            continue
        if isinstance(content, Path):
            if content.read_bytes() != (old / name).read_bytes():
                diffs.append(f"{name}: bytes differ")
            continue
        theirs = read_safetensors(old / name)
        for t in sorted(set(theirs) | set(content)):
            if t == "meta.json":
                a = json.loads(theirs[t][2]) if t in theirs else None
                b = json.loads(content[t][2]) if t in content else None
                if a != b:
                    diffs.append(f"{name} meta.json: {a} != {b}")
            elif theirs.get(t) != content.get(t):
                diffs.append(f"{name} `{t}`: " + ("missing" if t not in content else "extra" if t not in theirs else "differs"))
    return diffs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a checkpoint directory of the current code (RUN/checkpoints/step-N)")
    ap.add_argument("out", nargs="?", help="the new 865bef1 run directory")
    ap.add_argument("--epochs", type=int, help="the new run's `epochs` (it ends at epochs x epoch_length env steps)")
    ap.add_argument("--paper", action="store_true", help="drop the speed options: 865bef1 continues under the paper's schedule")
    ap.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="STEPS",
        help="the new run's `checkpoint_every` (its checkpoints carry `wall_s` and `phase_s`: a shorter segment to time)",
    )
    ap.add_argument("--compare", metavar="FORMAT1_CHECKPOINT", help="compare with 865bef1's checkpoint of the same step")
    a = ap.parse_args()
    try:
        if a.compare:
            diffs = compare(a.checkpoint, a.compare)
            for d in diffs:
                print(d)
            print(f"{len(diffs)} differences")
            sys.exit(1 if diffs else 0)
        if not a.out or a.epochs is None:
            ap.error("give NEW_RUN_DIR and --epochs (or --compare)")
        write(a.checkpoint, a.out, a.epochs, a.paper, a.checkpoint_every)
    except (Refused, OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
