"""How stable is the demo family's training recipe? Seeds x recipe variants x models, on the digits splits.

    python benchmarks/bench_zoo.py [--models klas_vit_ti,...] [--seeds 0,1,2] [--variant NAME:k=v,k=v ...]
                                   [--data NAME:k=v,k=lo/hi ...]
                                   [--jobs 2] [--root cache] [--out benchmarks/results/zoo.json] [--add]

Each (model, variant, seed) trains the model from scratch with :func:`klas.zoo.train.train_model` (the
recipe ``klas zoo`` uses, :data:`klas.zoo.RECIPES`, with the variant's fields replaced and ``seed`` set),
one process per job at one torch thread (results do not depend on ``--jobs``: same seed, same thread
count, same weights). Every trained model is measured on the **score** split (to choose a recipe on) and
the **eval** split (to report). Per model and variant the table gives mean ± std and the spread
(max − min) over seeds on both splits, and the ladder: the gap to the next smaller model of its family
in units of the larger of the two spreads.

A variant is ``name:field=value,...`` over :class:`klas.zoo.train.Recipe`'s fields; ``default`` (no
fields) is the current recipe. ``--data name:field=value,...`` does the same over
:class:`klas.data.DigitsConfig`'s fields (a pair as ``lo/hi``, e.g. ``scale=0.6/1.1``): the task itself,
generated with other parameters (a harder or easier digits set; ``default`` is the built-in one), so
a study can ask how hard the task must be for the family to leave room between its members. Every
(data, variant) pair is trained. ``--add`` keeps the (model, data, variant, seed) rows of an earlier
``--out``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's klas, also when run from elsewhere

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from klas.term import make_console  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

_DATA: dict = {}


def _init_worker(root: str, save: str | None) -> None:
    import torch

    torch.set_num_threads(1)
    _DATA["root"], _DATA["save"] = root, save


def _train_one(job: tuple[str, str, dict, int, str, dict]) -> dict:
    import torch

    from klas.zoo import RECIPES
    from klas.zoo.run import zoo_split_tensors
    from klas.zoo.train import accuracy, train_model

    arch, variant, fields, seed, data_name, data_fields = job
    recipe = dataclasses.replace(RECIPES[arch], **fields, seed=seed)
    digits = _digits(data_fields)
    data = zoo_split_tensors(arch, Path(_DATA["root"]), limit=recipe.limit, data=digits)
    result = train_model(arch, data["probe-train"], data["eval"], recipe)
    import timm

    model = timm.create_model(arch, pretrained=False)
    model.load_state_dict(result.state_dict)
    score = accuracy(model, *data["score"])
    if _DATA["save"]:
        from safetensors.torch import save_file

        path = Path(_DATA["save"]) / f"{arch}-{data_name}-{variant}-s{seed}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(result.state_dict, str(path), metadata={"format": "pt"})
    return {"model": arch, "data": data_name, "data_fields": data_fields, "data_fingerprint": digits.fingerprint(),
            "variant": variant, "seed": seed, "fields": fields, "recipe": recipe.to_json(),
            "score_acc": round(score, 6), "eval_acc": round(result.eval_acc, 6), "steps": result.steps,
            "seconds": round(result.seconds, 1), "threads": torch.get_num_threads()}


def _parse_variant(text: str) -> tuple[str, dict]:
    from klas.zoo.train import Recipe

    name, _, body = text.partition(":")
    types = {f.name: f.type for f in dataclasses.fields(Recipe)}
    fields = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"error: unknown recipe field {key!r} in --variant {text!r}; fields: {', '.join(types)}")
        fields[key] = float(value) if "float" in str(types[key]) else int(value)
    return name, fields


def _parse_data(text: str) -> tuple[str, dict]:
    """``name:field=value,...`` over :class:`klas.data.DigitsConfig` (pairs as ``lo/hi``) -> (name, fields)."""
    from klas.data import DigitsConfig

    name, _, body = text.partition(":")
    defaults = DigitsConfig()
    fields: dict = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if not hasattr(defaults, key):
            names = ", ".join(f.name for f in dataclasses.fields(DigitsConfig))
            raise SystemExit(f"error: unknown digits field {key!r} in --data {text!r}; fields: {names}")
        kind = type(getattr(defaults, key))
        try:
            fields[key] = [float(v) for v in value.split("/")] if kind is tuple else kind(value)
        except ValueError:
            what = {tuple: "a pair of numbers lo/hi", int: "a whole number"}.get(kind, "a number")
            raise SystemExit(f"error: --data {text!r}: {key}={value!r} is not {what}") from None
        if kind is tuple and len(fields[key]) != 2:
            raise SystemExit(f"error: --data {text!r}: {key} takes a pair, e.g. {key}=0.6/1.1")
    _digits(fields)  # validates the combination
    return name, fields


def _digits(fields: dict):
    """The :class:`klas.data.DigitsConfig` of a ``--data`` variant's (JSON-able) fields."""
    from klas.data import DigitsConfig

    return DigitsConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _summary(rows: list[dict], split: str) -> tuple[float, float, float]:
    accs = [100 * r[f"{split}_acc"] for r in rows]
    return statistics.mean(accs), (statistics.stdev(accs) if len(accs) > 1 else 0.0), max(accs) - min(accs)


def _table(rows: list[dict], console: Console) -> None:
    from klas.zoo import BENCH_FAMILIES, FAMILIES

    # a model in a demo family and a benchmark family (klas_vit_s) is laddered within its demo family
    family_of = {m: members for members in (*BENCH_FAMILIES.values(), *FAMILIES.values()) for m in members}
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("data", "default"), r["variant"], r["model"]), []).append(r)
    table = Table(title="demo family: top-1 over seeds (mean ± std, spread = max − min), digits splits")
    for col in ("data", "variant", "model", "seeds", "score %", "eval %", "eval spread", "gap / spread", "train s"):
        table.add_column(col, justify="left" if col in ("data", "variant", "model") else "right")
    for (data, variant, model), rs in sorted(groups.items()):
        s_mean, s_std, _ = _summary(rs, "score")
        e_mean, e_std, e_spread = _summary(rs, "eval")
        members = family_of.get(model, (model,))
        idx = members.index(model)
        ladder = ""
        if idx > 0 and (data, variant, members[idx - 1]) in groups:
            lower = groups[(data, variant, members[idx - 1])]
            gap = e_mean - _summary(lower, "eval")[0]
            ladder = f"{gap:+.2f} / {max(e_spread, _summary(lower, 'eval')[2], 0.01):.2f}"
        table.add_row(data, variant, model, str(len(rs)), f"{s_mean:.2f} ± {s_std:.2f}", f"{e_mean:.2f} ± {e_std:.2f}",
                      f"{e_spread:.2f}", ladder, f"{statistics.mean(r['seconds'] for r in rs):.0f}")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    from klas.utils import DEFAULT_ROOT, machine_info, package_versions, write_json_atomic
    from klas.zoo import DEMO_ARCHS, ZOO_ARCHS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(DEMO_ARCHS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variant", action="append", default=None, help="name:field=value,... (repeatable)")
    p.add_argument("--data", action="append", default=None,
                   help="name:field=value,... over the digits generator's fields, pairs as lo/hi (repeatable)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--out", type=Path, default=RESULTS / "zoo.json")
    p.add_argument("--add", action="store_true", help="keep the rows of an earlier --out")
    p.add_argument("--save", type=Path, default=None, help="keep each trained model as DIR/<model>-<data>-<variant>-s<seed>.safetensors")
    args = p.parse_args(argv)
    console = make_console()
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in ZOO_ARCHS]
    if unknown:
        raise SystemExit(f"error: unknown zoo model {unknown[0]!r}; the zoo has {', '.join(ZOO_ARCHS)}")
    variants = [_parse_variant(v) for v in (args.variant or ["default:"])]
    datas = [_parse_data(d) for d in (args.data or ["default:"])]
    seeds = [int(s) for s in args.seeds.split(",")]
    earlier = json.loads(args.out.read_text()) if args.add and args.out.is_file() else {}
    old = earlier.get("rows", [])
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    commands = [*earlier.get("commands", [earlier["command"]] if "command" in earlier else []), command]
    done = {(r["model"], r.get("data", "default"), r["variant"], r["seed"]) for r in old}
    jobs = [(m, name, fields, s, data, data_fields) for data, data_fields in datas for name, fields in variants
            for m in models for s in seeds if (m, data, name, s) not in done]
    # longest first, so the pool stays busy to the end
    jobs.sort(key=lambda j: -{"klas_vit_b": 5, "klas_vit_d8": 4, "klas_resnet_l": 3, "klas_vit_s": 2}.get(j[0], 1))
    start = time.perf_counter()
    rows = list(old)
    with ProcessPoolExecutor(args.jobs, initializer=_init_worker, initargs=(str(args.root), str(args.save) if args.save else None)) as pool:
        for row in pool.map(_train_one, jobs):
            rows.append(row)
            console.print(f"{row['data']:>10} {row['variant']:>12} {row['model']:<14} seed {row['seed']}: "
                          f"score {100 * row['score_acc']:.2f}%  eval {100 * row['eval_acc']:.2f}%  {row['seconds']:.0f}s")
            write_json_atomic(args.out, {
                "command": command, "commands": commands,  # with --add: every run whose rows are here
                "machine": machine_info("cpu"), "versions": package_versions(), "jobs": args.jobs,
                "rows": rows,
            })
    _table(rows, console)
    console.print(f"results: {args.out}  [{time.perf_counter() - start:.0f} s wall, {args.jobs} jobs x 1 thread]")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
