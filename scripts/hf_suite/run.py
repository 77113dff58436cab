#!/usr/bin/env python
"""Run transformers' own generation tests (GenerationTesterMixin) stock and with a PlugCache, and compare.

    python scripts/hf_suite/run.py --src /path/to/transformers/tests [--families llama,qwen3] [--mode both]
                                   [-k EXPR] [--jobs 2] [--out DIR]

For each family and mode it runs pytest on `tests/models/<family>/test_modeling_<family>.py` of the given test
sources, keeping only the tests defined on `GenerationTesterMixin` (hf_suite_plugin.py does the selection and, in
plug mode, gives every generate() call a PlugCache). Then it writes DIR/summary.md and DIR/summary.json: per family
and mode the passed / failed / error / skipped counts and how many generate() calls got a PlugCache, and the tests
that pass stock but fail plugged, with the first line of each error.

Exit status: 0 no regression; 1 at least one test passes stock and fails plugged; 2 no regression but the run is
not trustworthy (a pytest run crashed or failed to collect, a plug run injected no PlugCache at all, or a family
lacks results for a mode). See README.md in this folder.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5",
            "qwen3_5_moe"]
MODES = ("stock", "plug")
BAD = ("failed", "error")
# Plug-only failures a test's own assumption causes, not hf_kvplug: test name -> (text in the error, why). Listed in
# the summary apart, and they do not fail the run; anything else that passes stock and fails plugged does.
BY_DESIGN = {
    "test_generate_compile_model_forward_fullgraph": (
        "True is not false",
        "older sources (5.4.0's) assert that generate()'s *default* cache is a non-compileable DynamicCache; the "
        "injected PlugCache is a compileable DynamicCache subclass (later sources check this only for a "
        "non-compileable cache). The compiled half of the test passes cache_implementation='static' and gets no "
        "PlugCache either way"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--src", required=True, type=Path,
                   help="transformers' tests/ folder for the installed release (or the checkout holding tests/)")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help=f"comma-separated model families (default: {','.join(FAMILIES)})")
    p.add_argument("--mode", choices=("stock", "plug", "both"), default="both")
    p.add_argument("-k", dest="keyword", default=None, help="passed to pytest -k (narrows the selection further)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: /tmp/hf_suite/transformers-<installed version>)")
    p.add_argument("--jobs", type=int, default=1, help="pytest processes at once (default 1; 2 on a 2-core box)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per pytest process (default 1)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter that runs pytest (needs transformers, hf_kvplug, torch, pytest, parameterized)")
    p.add_argument("--slack", type=int, default=64,
                   help="tokens added to each injected cache's max_cache_len, for tests that continue generating "
                        "from a returned cache (default 64; 0 sizes exactly prompt + new tokens)")
    p.add_argument("--kv-dtype", choices=("int8", "int4"), default=None,
                   help="kv_dtype of the injected caches (default: the model's dtype; quantized K/V are expected to "
                        "fail exact-match tests)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per pytest process (default 3600)")
    p.add_argument("--summarize-only", action="store_true",
                   help="run nothing; rebuild the summary from the results already in --out")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after `--`")
    return p.parse_args(argv)


def resolve_root(src: Path) -> Path:
    """The folder holding `tests/` (pytest's rootdir; the tests import themselves as the `tests` package)."""
    src = src.resolve()
    for candidate in (src.parent, src):
        if (candidate / "tests" / "generation" / "test_utils.py").is_file():
            return candidate
    sys.exit(f"error: no tests/generation/test_utils.py under {src} or {src.parent}: --src must be transformers' "
             "tests/ folder (or the checkout that holds it); see scripts/hf_suite/README.md")


def interpreter_facts(python: str) -> dict:
    code = ("import json, transformers, torch, pytest, parameterized, hf_kvplug; "
            "print(json.dumps({'transformers': transformers.__version__, 'torch': torch.__version__, "
            "'pytest': pytest.__version__, 'hf_kvplug': hf_kvplug.__version__, "
            "'hf_kvplug_path': hf_kvplug.__file__, 'cache_kwarg': hf_kvplug.CACHE_KWARG}))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd="/tmp", check=False)
    if proc.returncode != 0:
        sys.exit(f"error: {python} cannot import what the tests need:\n{proc.stderr.strip()}\n"
                 "see scripts/hf_suite/README.md (environment)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def source_version(root: Path) -> str | None:
    init = root / "src" / "transformers" / "__init__.py"
    if not init.is_file():
        return None
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', init.read_text(), re.MULTILINE)
    return match.group(1) if match else None


def run_one(args, root: Path, out: Path, family: str, mode: str) -> dict:
    test_file = root / "tests" / "models" / family / f"test_modeling_{family}.py"
    results = out / f"results-{mode}-{family}.json"
    log = out / f"log-{mode}-{family}.txt"
    if results.exists():
        results.unlink()
    if not test_file.is_file():
        return {"family": family, "mode": mode, "rc": None, "error": f"missing {test_file}"}
    env = dict(os.environ)
    env.update({
        "HF_SUITE_MODE": mode,
        "HF_SUITE_RESULTS": str(results),
        "HF_SUITE_SLACK": str(args.slack),
        "HF_SUITE_KV_DTYPE": args.kv_dtype or "",
        "HF_SUITE_THREADS": str(args.threads),
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p]),
    })
    cmd = [args.python, "-m", "pytest", "-p", "no:cacheprovider", "-p", "hf_suite_plugin",
           "-c", str(HERE / "pytest.ini"), f"--rootdir={root}", f"--confcutdir={root / 'tests'}",
           "-q", "-rfE", "--tb=short", str(test_file)]
    if args.keyword:
        cmd += ["-k", args.keyword]
    cmd += args.pytest_args
    started = time.time()
    with open(log, "w") as f:
        shown = {k: env[k] for k in ("HF_SUITE_MODE", "HF_SUITE_RESULTS", "HF_SUITE_SLACK", "HF_SUITE_KV_DTYPE",
                                     "HF_SUITE_THREADS", "OMP_NUM_THREADS", "PYTHONPATH")}
        f.write("$ cd /tmp && " + " ".join(f"{k}={shlex.quote(v)}" for k, v in shown.items()) + " "
                + shlex.join(cmd) + "\n\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, cwd="/tmp", env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=args.timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = log.read_text().strip().splitlines()[-1:] or [""]
    print(f"  {mode:5s} {family:12s} rc={rc} {time.time() - started:6.0f}s  {tail[0][:110]}", flush=True)
    return {"family": family, "mode": mode, "rc": rc, "error": None}


def load(out: Path, family: str, mode: str) -> dict | None:
    path = out / f"results-{mode}-{family}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def counts(data: dict) -> dict:
    c = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for test in data["tests"].values():
        c[test["outcome"]] = c.get(test["outcome"], 0) + 1
    return c


def short(nodeid: str) -> str:
    return nodeid.split("::", 1)[-1]


def summarize(out: Path, families: list[str], runs: list[dict], facts: dict, extra: dict) -> int:
    rows, regressions, problems, fixed, by_design = [], [], [], [], []
    for family in families:
        data = {mode: load(out, family, mode) for mode in MODES}
        for mode in MODES:
            d = data[mode]
            if d is None:
                problems.append(f"{family}: no {mode} results")
                continue
            c = counts(d)
            plug = d.get("plug_totals", {})
            exercised = sum(1 for t in d["tests"].values() if (t.get("plug") or {}).get("injected"))
            rows.append({"family": family, "mode": mode, **c, "total": len(d["tests"]),
                         "generate_calls_plugged": plug.get("injected", 0) if mode == "plug" else None,
                         "tests_plugged": exercised if mode == "plug" else None,
                         "passed_plugged": sum(1 for t in d["tests"].values() if t["outcome"] == "passed"
                                               and (t.get("plug") or {}).get("injected")) if mode == "plug" else None,
                         "transformers": d.get("transformers"), "finished": d.get("finished"),
                         "exitstatus": d.get("exitstatus")})
            for err in d.get("collection_errors", []):
                problems.append(f"{family} {mode}: collection error in {err['nodeid']}: {err['message']}")
            if not d["tests"]:
                problems.append(f"{family} {mode}: no test ran")
            if mode == "plug" and d["tests"] and not plug.get("injected"):
                problems.append(f"{family} plug: no generate() call got a PlugCache (nothing was plugged)")
        for run in runs:
            if run["family"] == family and (run["error"] or run["rc"] not in (0, 1, 5)):
                problems.append(f"{family} {run['mode']}: pytest rc={run['rc']} {run['error'] or ''}".strip())
        if data["stock"] and data["plug"]:
            for nodeid, s in data["stock"]["tests"].items():
                p = data["plug"]["tests"].get(nodeid)
                if p is None:
                    continue
                if s["outcome"] == "passed" and p["outcome"] in BAD:
                    name = short(nodeid).split("::")[-1]
                    known = BY_DESIGN.get(name)
                    (by_design if known and known[0] in (p["message"] or "") else regressions).append(
                        {"family": family, "test": short(nodeid), "outcome": p["outcome"], "error": p["message"],
                         "plug": p.get("plug"), **({"why": known[1]} if known else {})})
                elif s["outcome"] in BAD and p["outcome"] == "passed":
                    fixed.append({"family": family, "test": short(nodeid), "stock_error": s["message"]})

    summary = {"facts": facts, **extra, "rows": rows, "regressions": regressions, "by_design": by_design,
               "plug_only_passes": fixed, "problems": problems}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    lines = [f"# hf_kvplug x transformers generation tests ({facts.get('transformers')})", "",
             (f"transformers {facts.get('transformers')}, torch {facts.get('torch')}, hf_kvplug "
              f"{facts.get('hf_kvplug')} ({facts.get('hf_kvplug_path')}), cache keyword "
              f"`{facts.get('cache_kwarg')}`; tests from {extra.get('root')}; slack {extra.get('slack')}, "
              f"kv_dtype {extra.get('kv_dtype')}; -k {extra.get('keyword')!r}"), "",
             ("| family | mode | passed | failed | error | skipped | generate() calls plugged | tests plugged "
              "(passed) |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        plugged = "" if r["mode"] == "stock" else str(r["generate_calls_plugged"])
        tests = "" if r["mode"] == "stock" else f"{r['tests_plugged']} ({r['passed_plugged']})"
        lines.append(f"| {r['family']} | {r['mode']} | {r['passed']} | {r['failed']} | {r['error']} | "
                     f"{r['skipped']} | {plugged} | {tests} |")
    lines += ["", f"## Pass stock, fail plugged: {len(regressions)}", ""]
    for r in regressions:
        lines.append(f"- **{r['family']}** `{r['test']}` ({r['outcome']}): {r['error']}")
    if by_design:
        lines += ["", f"## Pass stock, fail plugged by the test's own assumption (BY_DESIGN in run.py): "
                      f"{len(by_design)}", ""]
        for r in by_design:
            lines.append(f"- {r['family']} `{r['test']}`: {r['error']} ({r['why']})")
    if fixed:
        lines += ["", f"## Fail stock, pass plugged (for information): {len(fixed)}", ""]
        for r in fixed:
            lines.append(f"- {r['family']} `{r['test']}` (stock: {r['stock_error']})")
    if problems:
        lines += ["", f"## Problems with the run itself: {len(problems)}", ""]
        lines += [f"- {p}" for p in problems]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print("\n" + text)
    print(f"(written to {out / 'summary.md'} and {out / 'summary.json'})")
    if regressions:
        return 1
    return 2 if problems else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    root = resolve_root(args.src)
    facts = interpreter_facts(args.python)
    out = (args.out or Path("/tmp/hf_suite") / f"transformers-{facts['transformers']}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    modes = MODES if args.mode == "both" else (args.mode,)
    src_version = source_version(root)
    if src_version and src_version != facts["transformers"]:
        print(f"WARNING: the test sources are transformers {src_version} but {facts['transformers']} is installed; "
              "tests written for another release fail or skip for reasons of their own", file=sys.stderr)
    extra = {"root": str(root), "slack": args.slack, "kv_dtype": args.kv_dtype, "keyword": args.keyword,
             "source_version": src_version}
    runs: list[dict] = []
    if not args.summarize_only:
        print(f"transformers {facts['transformers']}, hf_kvplug {facts['hf_kvplug_path']}; tests: {root}; "
              f"results: {out}", flush=True)
        jobs = [(family, mode) for family in families for mode in modes]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            runs = list(pool.map(lambda fm: run_one(args, root, out, *fm), jobs))
    return summarize(out, families, runs, facts, extra)


if __name__ == "__main__":
    sys.exit(main())
