"""What online sharded upcycling costs against the alternatives, side by side, per rank.

    python benchmarks/upcycle_cost.py [--models smollm2,llama_233m] [--cases ID,...] [--merge]

For each dense checkpoint and layout, five paths run one after the other, each as a fresh
torchrun job on N gloo ranks (``benchmarks/upcycle_paths.py`` says what each does):

  a ours    our online sharded upcycling (build the MoE chunk, fill it from slice reads)
  b mcore   megatron-core's ``load_and_upcycle_model`` (dense model + state-dict conversion)
  c naive   every rank reads the whole dense checkpoint, then fills its MoE chunk
  d dense   plain ``dist_checkpointing.load`` into a dense model (the time floor for reading)
  e floor   the MoE chunk built, nothing loaded (the memory floor: the result itself)

Per rank: wall and CPU seconds of each phase, peak resident memory over the baseline taken
after imports and process-group init (glibc told to return freed memory:
``MALLOC_MMAP_THRESHOLD_=65536``), and bytes read through read() calls. The ratios the issue
sets targets for are computed per rank from the same run: ours/floor (<= 1.1x), ours/mcore
(<= 0.45x) and our fill time / the dense load phase (<= 1.5x); the worst rank is reported.
Before every path the script waits until the machine has the memory that path needs plus
2 GiB free (the machine is shared); a path that cannot fit is skipped with the reason.

Models: the embedded SmolLM2-135M (9 heads: TP1 only at 1/2/4 ranks, so EP layouts) and a
generated random 233M Llama (10 layers, hidden 1024, FFN 4096, 16 heads, vocab 32000; made
once in the cache by ``benchmarks/generated_llama.py``), E8T2 top-k-then-softmax on every
layer. Writes benchmarks/results/upcycle_cost.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import machine  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PATHS = ("floor", "dense", "ours", "naive", "mcore")
LETTER = {"ours": "a", "mcore": "b", "naive": "c", "dense": "d", "floor": "e"}
TARGETS = {"ours_over_floor": 1.1, "ours_over_mcore": 0.45, "fill_over_dense_load": 1.5}
RANK_OVERHEAD = 600 * 2**20  # a rank's libraries and process group (measured: ~440 MB)

LAYOUTS = {
    "smollm2": [(1, "tp1", []), (2, "ep2", ["parallel.ep=2"]), (4, "ep4", ["parallel.ep=4"])],
    "llama_233m": [
        (1, "tp1", []),
        (2, "ep2", ["parallel.ep=2"]),
        (2, "tp2", ["parallel.tp=2", "parallel.sp=true"]),
        (4, "ep4", ["parallel.ep=4"]),
        (4, "tp2_ep2", ["parallel.tp=2", "parallel.ep=2", "parallel.sp=true"]),
    ],
    # Seconds-sized: the GPU script's dry run on CPU (benchmarks/gpu/run.sh DRY_RUN=1).
    "tiny_dry": [(1, "tp1", [])],
}


def dense_checkpoint(model: str, cache_dir: Path) -> tuple[Path, list[str]]:
    """The dense checkpoint of ``model`` (made or imported on first use) and its model overrides."""
    if model in ("smollm2", "smollm2_135m"):
        from nemo_upcycle.checkpoint.sources.embedded import ensure_embedded

        path = ensure_embedded("embedded:smollm2_135m", cache_dir)["torch_dist"]
        return path, ["model=smollm2_135m", f"model.dense_checkpoint={path}"]
    from benchmarks.generated_llama import ensure, model_overrides

    path = ensure(model, cache_dir)
    return path, model_overrides(model, path)


def memory_need(overrides: list[str], nproc: int) -> dict[str, int]:
    """Rough total bytes each path needs on the machine (all ranks), from parameter counts."""
    from nemo_upcycle.planner.params import rank_params
    from nemo_upcycle.config.compose import compose_config
    from nemo_upcycle.config.parallel_sizes import expert_tensor_parallel

    cfg = compose_config(overrides)
    dense_cfg = compose_config(overrides + ["moe=dense"])
    par = cfg.parallel
    etp = expert_tensor_parallel(par)
    moe = 4 * rank_params(cfg, 0, par.tp, par.ep, etp).total
    dense = 4 * rank_params(dense_cfg, 0, par.tp, 1, par.tp).total
    full = 4 * rank_params(dense_cfg, 0, 1, 1, 1).total
    per_rank = {
        "floor": moe, "ours": int(1.1 * moe), "dense": dense, "naive": moe + full,
        # the dense model, deep copies of both state dicts, the MoE model
        "mcore": 2 * moe + 2 * dense,
    }
    return {k: nproc * (v + RANK_OVERHEAD) for k, v in per_rank.items()}


def run_path(path: str, nproc: int, overrides: list[str], dense_path: Path) -> dict:
    from tests.support.multirank import run_on_ranks

    started = time.perf_counter()
    ranks = run_on_ranks(
        "benchmarks.upcycle_paths:measure", nproc, timeout_s=1800,
        env={"MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)},
        path=path, overrides=overrides, dense_path=str(dense_path),
    )
    return {"status": "ok", "launch_wall_s": round(time.perf_counter() - started, 1), "ranks": ranks}


def _ratio(a: float, b: float):
    return round(a / b, 3) if b else None


def summarise(case: dict) -> dict:
    """Per-rank ratios from one case's paths; the worst rank and whether each target is met."""
    paths = case["paths"]
    ok = {p: paths.get(p, {}).get("status") == "ok" for p in PATHS}
    ratios: dict = {}
    if ok["ours"] and ok["floor"]:
        ratios["ours_over_floor"] = max(
            _ratio(a["peak_over_baseline_bytes"], e["peak_over_baseline_bytes"])
            for a, e in zip(paths["ours"]["ranks"], paths["floor"]["ranks"]))
    if ok["ours"] and ok["mcore"]:
        ratios["ours_over_mcore"] = max(
            _ratio(a["peak_over_baseline_bytes"], b["peak_over_baseline_bytes"])
            for a, b in zip(paths["ours"]["ranks"], paths["mcore"]["ranks"]))
    if ok["ours"] and ok["dense"]:
        ratios["fill_over_dense_load"] = max(
            _ratio(a["phases"]["fill"], d["phases"]["load"])
            for a, d in zip(paths["ours"]["ranks"], paths["dense"]["ranks"]))
        ratios["fill_over_dense_load_cpu"] = max(
            _ratio(a["phases_cpu"]["fill"], d["phases_cpu"]["load"])
            for a, d in zip(paths["ours"]["ranks"], paths["dense"]["ranks"]))
    if ok["ours"] and ok["mcore"]:
        ratios["mcore_convert_over_fill"] = min(
            _ratio(b["phases"]["convert"], a["phases"]["fill"])
            for a, b in zip(paths["ours"]["ranks"], paths["mcore"]["ranks"]))
    met = {k: ratios[k] <= t for k, t in TARGETS.items() if ratios.get(k) is not None}
    return {"ratios_worst_rank": ratios, "targets": TARGETS, "met": met}


def run_case(model: str, nproc: int, layout: str, extra: list[str], cache_dir: Path, max_wait_s: float,
             paths: tuple[str, ...] = PATHS) -> dict:
    dense_path, overrides = dense_checkpoint(model, cache_dir)
    overrides = overrides + ["moe=e8t2", "router=topk_softmax"] + extra
    needs = memory_need(overrides, nproc)
    case = {"id": f"{model}/{layout}", "model": model, "nproc": nproc, "layout": layout,
            "overrides": overrides, "dense_checkpoint_bytes": sum(f.stat().st_size for f in dense_path.iterdir()),
            "memory_need_estimate_bytes": needs, "paths": {}}
    print(f"== {case['id']} on {nproc} rank(s)", flush=True)
    for path in paths:
        fits, reason = machine.wait_for_memory(needs[path], max_wait_s=max_wait_s, label=f"{LETTER[path]} {path}")
        if not fits:
            case["paths"][path] = {"status": "skipped", "reason": reason}
            print(f"  {LETTER[path]} {path:<6} skipped: {reason}", flush=True)
            continue
        result = run_path(path, nproc, overrides, dense_path)
        case["paths"][path] = result
        worst = max(r["peak_over_baseline_bytes"] for r in result["ranks"])
        phases = {k: max(r["phases"][k] for r in result["ranks"]) for k in result["ranks"][0]["phases"]}
        print(f"  {LETTER[path]} {path:<6} peak over baseline {worst / 2**20:7.0f} MiB  "
              + "  ".join(f"{k} {v:.2f}s" for k, v in phases.items()), flush=True)
    case["summary"] = summarise(case)
    print(f"  ratios (worst rank): {case['summary']['ratios_worst_rank']}", flush=True)
    return case


# -- output ------------------------------------------------------------------------------------
def _fmt_phases(result: dict, key: str = "phases") -> str:
    names = list(result["ranks"][0][key])
    return ", ".join(f"{n} {max(r[key][n] for r in result['ranks']):.2f}" for n in names)


def table(cases: list[dict]) -> str:
    lines = [
        "| model / layout | ranks | path | peak over baseline, MiB (max rank) | x floor (e) | wall s by phase (max rank) | CPU s by phase | MB read per rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        paths = case["paths"]
        floor = paths.get("floor", {})
        for p in ("ours", "mcore", "naive", "dense", "floor"):
            r = paths.get(p)
            if r is None:
                continue
            label = f"{LETTER[p]} {p}"
            if r["status"] != "ok":
                lines.append(f"| {case['id']} | {case['nproc']} | {label} | skipped: {r['reason']} | | | | |")
                continue
            peaks = [x["peak_over_baseline_bytes"] for x in r["ranks"]]
            rel = ""
            if floor.get("status") == "ok":
                rel = f"{max(a / e['peak_over_baseline_bytes'] for a, e in zip(peaks, floor['ranks'])):.2f}"
            read = max(x["chars_read"] for x in r["ranks"]) / 1e6
            lines.append(f"| {case['id']} | {case['nproc']} | {label} | {max(peaks) / 2**20:.0f} | {rel} | "
                         f"{_fmt_phases(r)} | {_fmt_phases(r, 'phases_cpu')} | {read:.0f} |")
    lines += ["", "| model / layout | ours / floor (<= 1.1) | ours / mcore (<= 0.45) | fill / dense load, wall (<= 1.5) | same, CPU s | mcore convert / our fill |",
              "|---|---|---|---|---|---|"]
    for case in cases:
        r = case["summary"]["ratios_worst_rank"]
        met = case["summary"]["met"]

        def cell(key):
            if r.get(key) is None:
                return "n/a"
            return f"{r[key]:.2f}" + ("" if key not in met else (" ok" if met[key] else " MISSED"))

        lines.append(f"| {case['id']} | {cell('ours_over_floor')} | {cell('ours_over_mcore')} | "
                     f"{cell('fill_over_dense_load')} | {cell('fill_over_dense_load_cpu')} | {cell('mcore_convert_over_fill')} |")
    return "\n".join(lines)


def write_results(cases: list[dict], args, info: dict, started: float, final: bool = False) -> None:
    """JSON + markdown table; called after every case so a long run keeps what it measured."""
    out = Path(args.out)
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        fresh = {c["id"] for c in cases}
        cases = [c for c in old["cases"] if c["id"] not in fresh] + cases
        order = [f"{m}/{lay}" for m in LAYOUTS for _, lay, _ in LAYOUTS[m]]
        cases.sort(key=lambda c: order.index(c["id"]) if c["id"] in order else len(order))
        # this run's record replaces the one its previous incremental write left
        runs = [r for r in old.get("runs", []) if r.get("started_at") != started]
        runs.append({"started_at": started, "machine": info, "seconds": round(time.time() - started), "cases": sorted(fresh)})
    else:
        runs = [{"started_at": started, "machine": info, "seconds": round(time.time() - started),
                 "cases": [c["id"] for c in cases]}]
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    doc = {
        "benchmark": "upcycle_cost",
        "command": "python benchmarks/upcycle_cost.py " + " ".join(sys.argv[1:]),
        "note": ("CPU-only machine shared with other jobs (see load averages): compare paths within a case, "
                 "all measured in the same run; no GPU was available for this task."),
        "machine": info,
        "runs": runs,
        "cases": cases,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    text = table(cases)
    out.with_suffix(".md").write_text(
        f"# Upcycling cost per rank (generated by `{doc['command']}`)\n\n"
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, no GPU, shared with other "
        f"jobs; torch {info['torch']}, megatron-core {info['megatron_core']}, Python {info['python']}. "
        "Each path is a fresh torchrun job; peak RSS over the baseline after imports and process-group init, "
        "MALLOC_MMAP_THRESHOLD_=65536. Ratios are per rank, worst rank shown.\n\n" + text + "\n")
    if final:
        print("\n" + text)
    print(f"wrote {out} and {out.with_suffix('.md')}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,llama_233m")
    parser.add_argument("--cases", default=None, help="comma-separated ids, e.g. llama_233m/tp2,smollm2/ep2")
    parser.add_argument("--cache-dir", default=os.environ.get("NEMO_UPCYCLE_CACHE", str(Path.home() / ".cache" / "nemo_upcycle")))
    parser.add_argument("--max-wait-min", type=float, default=60.0, help="longest wait for free memory per path")
    parser.add_argument("--paths", default=",".join(PATHS), help="subset of " + ",".join(PATHS))
    parser.add_argument("--nproc", type=int, default=None, help="only the layouts with this many ranks")
    parser.add_argument("--merge", action="store_true", help="replace these cases in an existing JSON, keep the others")
    parser.add_argument("--out", default=str(RESULTS / "upcycle_cost.json"))
    args = parser.parse_args()
    os.chdir(REPO)  # the rank entry imports benchmarks.upcycle_paths from here

    wanted = set(args.cases.split(",")) if args.cases else None
    cache_dir = Path(args.cache_dir)
    info = machine.describe()
    started = time.time()
    cases = []
    todo = [(m, n, lay, extra) for m in args.models.split(",") for n, lay, extra in LAYOUTS[m]]
    if wanted:  # in the order given (the most wanted first, on a machine others share)
        order = args.cases.split(",")
        todo = sorted((t for t in todo if f"{t[0]}/{t[2]}" in wanted), key=lambda t: order.index(f"{t[0]}/{t[2]}"))
    paths = tuple(p for p in PATHS if p in args.paths.split(","))
    for model, nproc, layout, extra in todo:
        if args.nproc and nproc != args.nproc:
            continue
        case = run_case(model, nproc, layout, extra, cache_dir, args.max_wait_min * 60, paths)
        case["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        cases.append(case)
        write_results(list(cases), args, dict(info), started)

    write_results(cases, args, info, started, final=True)



if __name__ == "__main__":
    main()
